"""Adapter for Hugging Face ``transformers`` CLIP models: ``hf:<repo id or local folder>``.

Weights come from the Hugging Face cache (``local_files_only`` when offline); a miss raises
``WeightsNotAvailable``. Soft prompts enter through ``text_model.embeddings.token_embedding``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from vlmtune.backbones.base import Backbone
from vlmtune.backbones.openclip import _offline
from vlmtune.backbones.prefix import PreNormBlock, TextStack
from vlmtune.errors import WeightsNotAvailable, require


class HFPreprocess:
    """PIL image -> (3, H, W) tensor through a ``CLIPImageProcessor``."""

    def __init__(self, processor: object) -> None:
        self.processor = processor

    def __call__(self, image: object) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]  # type: ignore[operator]

    def __repr__(self) -> str:
        return f"HFPreprocess({self.processor.to_json_string()})"  # type: ignore[attr-defined]


class HFClipBackbone(Backbone):
    """A ``transformers.CLIPModel`` behind the ``Backbone`` interface."""

    def __init__(self, model: nn.Module, processor: object, tokenizer: object, spec: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.preprocess = HFPreprocess(processor)  # type: ignore[assignment]
        self.preprocess_id = f"hf:{processor.to_json_string()}"  # type: ignore[attr-defined]
        cfg = model.config
        self.embed_dim = int(cfg.projection_dim)
        self.token_width = int(cfg.text_config.hidden_size)
        self.context_length = int(cfg.text_config.max_position_embeddings)
        self.eot_token_id = int(tokenizer.eos_token_id)  # type: ignore[attr-defined]

    @classmethod
    def load(cls, spec: str, repo: str, device: str = "cpu") -> HFClipBackbone:
        transformers = require("transformers", "hf", f"backbone {spec}")
        offline = _offline()
        try:  # safetensors only: pickled .bin weights are never loaded (convert them once with transformers)
            model = transformers.CLIPModel.from_pretrained(repo, local_files_only=offline, use_safetensors=True)
            processor = transformers.CLIPImageProcessor.from_pretrained(repo, local_files_only=offline)
            tokenizer = transformers.CLIPTokenizer.from_pretrained(repo, local_files_only=offline)
        except OSError as exc:
            reason = str(exc).splitlines()[0] + " (vlmtune loads safetensors weights only, never pickled .bin files)"
            raise WeightsNotAvailable(spec, [f"huggingface cache or folder: {repo}"], reason) from exc
        return cls(model.to(device), processor, tokenizer, spec)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        out = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,  # type: ignore[operator]
            max_length=self.context_length,
            return_tensors="pt",
        )
        return out["input_ids"]

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.text_model.embeddings.token_embedding(tokens.to(self.device))  # (M, L, W)

    def _text_forward(self, embeds: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        tm = self.model.text_model
        length = embeds.shape[1]
        pos = tm.embeddings.position_embedding.weight[:length]
        x = embeds + pos  # (M, L', W)
        causal = torch.full((length, length), float("-inf"), device=x.device).triu(1)[None, None]
        if "causal_attention_mask" in inspect.signature(tm.encoder.forward).parameters:  # transformers 4.x
            x = tm.encoder(inputs_embeds=x, causal_attention_mask=causal).last_hidden_state
        else:  # transformers 5.x
            x = tm.encoder(inputs_embeds=x, attention_mask=causal, is_causal=True).last_hidden_state
        x = tm.final_layer_norm(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index.to(x.device)]  # (M, W)
        return self.model.text_projection(x)  # (M, D)

    def text_stack(self) -> TextStack | None:
        """CLIP's causal text encoder layers as pre-norm blocks (q, k, v projections side by side); None for an
        encoder of another shape (then prompts are encoded whole)."""
        tm = self.model.text_model
        blocks = []
        for layer in tm.encoder.layers:
            a = getattr(layer, "self_attn", None)
            if not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads")):
                return None

            def qkv(x: torch.Tensor, a: nn.Module = a) -> torch.Tensor:
                return torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], -1)  # (..., 3W)

            blocks.append(PreNormBlock(layer.layer_norm1, qkv, a.out_proj, a.num_heads, layer.layer_norm2, layer.mlp))

        def head(x: torch.Tensor) -> torch.Tensor:
            return self.model.text_projection(tm.final_layer_norm(x))  # (M, W) -> (M, D)

        return TextStack(tm.embeddings.position_embedding.weight, blocks, head)

    def visual_prompt_site(self) -> nn.Module:
        return self.model.vision_model.pre_layrnorm

    def image_tower(self) -> nn.Module:
        return nn.ModuleList([self.model.vision_model, self.model.visual_projection])

    def visual_blocks(self) -> Sequence[nn.Module]:
        return list(self.model.vision_model.encoder.layers)

    def _image_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vm = self.model.vision_model
        hidden = vm(pixel_values=images).last_hidden_state  # (B, 1+P, W)
        tokens = vm.post_layernorm(hidden)
        projected = self.model.visual_projection(tokens)  # (B, 1+P, D)
        return projected[:, 0], projected[:, 1:]
