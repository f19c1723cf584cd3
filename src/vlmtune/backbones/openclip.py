"""Adapter for open_clip models: ``openclip:<arch>@<pretrained tag | path to weights>`` or ``openclip:<arch>``.

Weights resolve without the network when they are already cached (Hugging Face hub cache or open_clip's
download folder) or given as a file; offline, a cache miss raises ``WeightsNotAvailable`` naming where we looked.
``openclip:<arch>`` alone builds a randomly initialised model (tests, benchmarks).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.backbones.base import Backbone
from vlmtune.backbones.prefix import PreNormBlock, TextStack
from vlmtune.errors import VlmtuneError, WeightsNotAvailable, require


def _no_unpickling() -> dict[str, bool]:
    """open_clip's switch for ``torch.load(weights_only=True)`` (``load_weights_only`` in 2.29-2.32, then
    ``weights_only``): checkpoints are read as tensors only, never unpickled into arbitrary objects."""
    import open_clip

    params = inspect.signature(open_clip.create_model_and_transforms).parameters
    name = next((n for n in ("weights_only", "load_weights_only") if n in params), None)
    if name is None:
        raise VlmtuneError(
            f"open_clip {open_clip.__version__} cannot load weights safely: pip install 'open_clip_torch>=2.29'"
        )
    return {name: True}


def _offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("VLMTUNE_OFFLINE", "HF_HUB_OFFLINE"))


def _cache_candidates(arch: str, tag: str, cache_dir: str | None) -> tuple[list[Path], list[str]]:
    """Existing cached weight files for (arch, tag) and every place that was searched."""
    ocp = require("open_clip.pretrained", "openclip", f"backbone openclip:{arch}")

    cfg = ocp.get_pretrained_cfg(arch, tag)
    if not cfg:
        known = ", ".join(ocp.list_pretrained_tags_by_model(arch)) or "none"
        raise WeightsNotAvailable(
            f"openclip:{arch}@{tag}", [], f"open_clip knows no tag {tag!r} for {arch} (known: {known})"
        )
    found: list[Path] = []
    searched: list[str] = []
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        parts = hub.rstrip("/").split("/")
        repo_id, subdir = "/".join(parts[:2]), "/".join(parts[2:])
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            fname = f"{subdir}/{name}" if subdir else name
            searched.append(f"huggingface cache: {repo_id}/{fname}")
            hit = try_to_load_from_cache(repo_id, fname, cache_dir=cache_dir)
            if isinstance(hit, str):
                found.append(Path(hit))
    url = cfg.get("url", "")
    if url:
        folder = Path(cache_dir or Path.home() / ".cache" / "clip")
        path = folder / os.path.basename(url)
        searched.append(str(path))
        if path.is_file():
            found.append(path)
    return found, searched


class OpenClipBackbone(Backbone):
    """An open_clip ``CLIP`` model behind the ``Backbone`` interface (ViT or ResNet image towers)."""

    def __init__(self, model: nn.Module, preprocess: object, tokenizer: object, spec: str) -> None:
        self.model = model.eval()
        self.preprocess = preprocess  # type: ignore[assignment]
        self.tokenizer = tokenizer
        self.spec = spec
        self.preprocess_id = f"openclip:{preprocess!r}".replace("\n", " ")
        if getattr(model, "text_pool_type", "argmax") != "argmax":
            raise NotImplementedError(
                f"{spec}: text pooling {model.text_pool_type!r} is not supported (CLIP uses argmax)"
            )
        self.context_length = int(model.context_length)
        self.token_width = int(model.token_embedding.weight.shape[1])
        proj = model.text_projection
        self.embed_dim = int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])
        self.eot_token_id = int(getattr(tokenizer, "eot_token_id", 49407))

    @classmethod
    def load(
        cls, spec: str, arch: str, pretrained: str | None, device: str = "cpu", cache_dir: str | None = None
    ) -> OpenClipBackbone:
        open_clip = require("open_clip", "openclip", f"backbone {spec}")
        weights: str | None = None
        if pretrained:
            if Path(pretrained).expanduser().is_file():
                weights = str(Path(pretrained).expanduser())
            else:
                found, searched = _cache_candidates(arch, pretrained, cache_dir)
                if found:
                    weights = str(found[0])
                elif _offline():
                    raise WeightsNotAvailable(spec, searched, "offline (VLMTUNE_OFFLINE / HF_HUB_OFFLINE is set)")
                else:
                    try:
                        model, _, preprocess = open_clip.create_model_and_transforms(
                            arch, pretrained=pretrained, device=device, cache_dir=cache_dir, **_no_unpickling()
                        )
                    except Exception as exc:  # network errors come in many types
                        raise WeightsNotAvailable(spec, searched, f"download failed: {exc}") from exc
                    return cls(model, preprocess, open_clip.get_tokenizer(arch), spec)
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=weights, device=device, **_no_unpickling()
        )
        return cls(model, preprocess, open_clip.get_tokenizer(arch), spec)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))  # type: ignore[operator]

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(tokens.to(self.device))  # (M, L, W)

    def _text_forward(self, embeds: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        m = self.model
        length = embeds.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = embeds.to(cast) + m.positional_embedding[:length].to(cast)  # (M, L', W)
        mask = m.attn_mask[:length, :length] if m.attn_mask is not None else None
        x = m.ln_final(m.transformer(x, attn_mask=mask))
        x = x[torch.arange(x.shape[0], device=x.device), eot_index.to(x.device)]  # (M, W)
        proj = m.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (M, D)

    def text_stack(self) -> TextStack | None:
        """CLIP's causal text transformer as pre-norm blocks; None for towers of another shape (then prompts
        are encoded whole)."""
        m = self.model
        blocks = getattr(getattr(m, "transformer", None), "resblocks", None)
        if blocks is None or m.attn_mask is None:
            return None
        parts = []
        for b in blocks:
            attn = getattr(b, "attn", None)
            plain = (
                isinstance(attn, nn.MultiheadAttention)
                and attn._qkv_same_embed_dim
                and attn.bias_k is None
                and not attn.add_zero_attn
                and not hasattr(b, "ln_1_kv")
            )
            if not plain:
                return None
            qkv = partial(F.linear, weight=attn.in_proj_weight, bias=attn.in_proj_bias)
            parts.append(PreNormBlock(b.ln_1, qkv, attn.out_proj, attn.num_heads, b.ln_2, b.mlp, b.ls_1, b.ls_2))
        proj = m.text_projection

        def head(x: torch.Tensor) -> torch.Tensor:
            x = m.ln_final(x)  # (M, W)
            return proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (M, D)

        return TextStack(m.positional_embedding, parts, head)

    def visual_prompt_site(self) -> nn.Module | None:
        visual = self.model.visual
        return visual.ln_pre if hasattr(visual, "class_embedding") and hasattr(visual, "ln_pre") else None

    def visual_blocks(self) -> Sequence[nn.Module] | None:
        if self.visual_prompt_site() is None:
            return None
        return list(self.model.visual.transformer.resblocks)

    @property
    def visual_batch_first(self) -> bool:
        return bool(getattr(self.model.visual.transformer, "batch_first", True))

    def _image_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.model.visual
        if hasattr(visual, "output_tokens") and hasattr(visual, "proj"):  # ViT: projected patch tokens
            previous = visual.output_tokens
            visual.output_tokens = True
            try:
                pooled, tokens = visual(images)  # (B, D), (B, P, W)
            finally:
                visual.output_tokens = previous
            if visual.proj is not None:
                tokens = tokens @ visual.proj  # (B, P, D)
            return pooled, tokens
        return self._resnet_forward(images)

    def _resnet_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ModifiedResNet: spatial features projected through the attention pool's value/output maps."""
        v = self.model.visual
        x = v.stem(images.to(v.conv1.weight.dtype))
        x = v.layer4(v.layer3(v.layer2(v.layer1(x))))  # (B, C, h, w)
        pooled = v.attnpool(x)  # (B, D)
        pool = v.attnpool
        spatial = x.flatten(2).transpose(1, 2) + pool.positional_embedding[1:].to(x.dtype)  # (B, hw, C)
        spatial = pool.c_proj(pool.v_proj(spatial))  # (B, hw, D)
        return pooled, spatial
