"""Backend ``transformers``: local image-text-to-text models (LLaVA-1.5, LLaVA-NeXT / 1.6, ...) and text-only LLMs.

``AutoProcessor`` + ``AutoModelForImageTextToText`` (``AutoModelForCausalLM`` for a text-only model), the
processor's chat template, left-padded batched generation, greedy unless the settings sample; 4-bit weights through
bitsandbytes where it is installed (``quantize="4bit"``: LatteCLIP's setting). Safetensors weights only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlmtune.errors import VlmtuneError, WeightsNotAvailable, require
from vlmtune.textgen.base import GenRequest, GenSettings, clean_text


def _messages(request: GenRequest) -> list[dict[str, Any]]:
    content: list[dict[str, str]] = [{"type": "image"}] if request.image is not None else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": request.prompt}]}]


class TransformersBackend:
    """A Hugging Face model (hub id in the local cache, or a folder) as a ``TextGenerator`` and a
    ``LikelihoodScorer``."""

    name = "transformers"
    follows_instructions = True

    def __init__(
        self, model: str, device: str = "cpu", batch_size: int = 8, quantize: str | None = None, dtype: str = "auto"
    ) -> None:
        transformers = require("transformers", "hf", f"text generation with {model}")
        from vlmtune.backbones.openclip import _offline

        self.model, self.device, self.batch_size = model, device, batch_size
        kwargs: dict[str, Any] = {"local_files_only": _offline(), "use_safetensors": True}
        if dtype != "auto":
            kwargs["dtype"] = getattr(torch, dtype)
        elif device.startswith("cuda"):
            kwargs["dtype"] = torch.bfloat16
        if quantize == "4bit":
            require("bitsandbytes", "textgen-hf", "4-bit generation")
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16
            )
        elif quantize is not None:
            raise VlmtuneError(f"quantize must be '4bit' or none, got {quantize!r}")
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(
                model, local_files_only=kwargs["local_files_only"]
            )
            try:
                net = transformers.AutoModelForImageTextToText.from_pretrained(model, **kwargs)
            except ValueError:  # a text-only LLM
                net = transformers.AutoModelForCausalLM.from_pretrained(model, **kwargs)
        except OSError as exc:
            reason = str(exc).splitlines()[0] + " (safetensors weights only)"
            raise WeightsNotAvailable(
                f"transformers:{model}", [f"huggingface cache or folder: {model}"], reason
            ) from exc
        self.net = net.eval() if quantize else net.to(device).eval()
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.revision = str(getattr(net.config, "_commit_hash", None) or "local")

    def _batch(self, requests: Sequence[GenRequest], settings: GenSettings) -> list[str]:
        texts = [self.processor.apply_chat_template(_messages(r), add_generation_prompt=True) for r in requests]
        images = [r.image for r in requests if r.image is not None]
        inputs = (
            self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
            if images
            else self.tokenizer(texts, return_tensors="pt", padding=True)
        )
        inputs = {k: v.to(self.net.device) for k, v in inputs.items()}
        sample = settings.temperature > 0
        if sample:
            torch.manual_seed(settings.seed)
        with torch.inference_mode():
            out = self.net.generate(
                **inputs,
                max_new_tokens=settings.max_new_tokens,
                do_sample=sample,
                temperature=settings.temperature if sample else None,
                top_p=settings.top_p if sample else None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[:, inputs["input_ids"].shape[1] :]  # (B, T) the generated tokens only
        return [clean_text(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def generate(self, requests: Sequence[GenRequest], settings: GenSettings) -> list[str]:
        out: list[str] = [""] * len(requests)
        for with_image in (True, False):  # one kind of input per batch
            idx = [i for i, r in enumerate(requests) if (r.image is not None) == with_image]
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                for i, text in zip(chunk, self._batch([requests[i] for i in chunk], settings), strict=True):
                    out[i] = text
        return out

    def _encode(self, texts: list[str], image: Any) -> dict[str, torch.Tensor]:
        if image is not None:
            return self.processor(text=texts, images=[image] * len(texts), return_tensors="pt", padding=True)
        return self.tokenizer(texts, return_tensors="pt", padding=True)

    @torch.inference_mode()
    def score(self, requests: Sequence[GenRequest], continuations: Sequence[str]) -> list[list[float]]:
        """Sum of the log-probabilities of each continuation's tokens after the request's chat prompt -> (R, C)
        (right-padded batches of continuations, the image repeated)."""
        out = []
        self.tokenizer.padding_side = "right"  # positions from 0 in every row: a plain forward pass
        try:
            for req in requests:
                prompt = self.processor.apply_chat_template(_messages(req), add_generation_prompt=True)
                start = int(self._encode([prompt], req.image)["attention_mask"].sum())  # prompt tokens
                row: list[float] = []
                for first in range(0, len(continuations), self.batch_size):
                    chunk = [prompt + c for c in continuations[first : first + self.batch_size]]
                    inputs = {k: v.to(self.net.device) for k, v in self._encode(chunk, req.image).items()}
                    logp = self.net(**inputs).logits.float().log_softmax(-1)  # (B, T, V)
                    ids, mask = inputs["input_ids"], inputs["attention_mask"]
                    picked = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1): token t+1
                    keep = mask[:, 1:].bool() & (torch.arange(ids.shape[1] - 1, device=ids.device) >= start - 1)
                    row += (picked * keep).sum(1).tolist()
                out.append(row)
        finally:
            self.tokenizer.padding_side = "left"
        return out
