"""Adapter for the bundled ToyCLIP (``toy``) and for ToyCLIP-format folders (``local:/path``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from vlmtune.backbones.base import Backbone
from vlmtune.backbones.prefix import PreNormBlock, TextStack
from vlmtune.errors import UnknownName, WeightsNotAvailable
from vlmtune.toy.model import ToyCLIP, ToyCLIPConfig
from vlmtune.toy.tokenizer import ToyTokenizer

WEIGHTS_NAME, META_NAME = "toy_clip.safetensors", "toy_clip.json"


TOY_SIZES = ("toy", "small")  # ``toy`` = the bundled ToyCLIP, ``toy:small`` = its 4x smaller sibling (a student)


def bundled_weights_dir(name: str = "toy") -> Path:
    """The folder of a bundled ToyCLIP: ``toy`` (base) or ``small``."""
    if name not in TOY_SIZES:
        raise UnknownName("toy backbone", name, list(TOY_SIZES))
    root = Path(str(resources.files("vlmtune.toy") / "weights"))
    return root if name == "toy" else root / name


class ToyPreprocess:
    """PIL image -> (3, S, S) float tensor: RGB, resize the short side, centre crop, normalise."""

    def __init__(self, size: int, mean: float, std: float) -> None:
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        w, h = image.size
        scale = self.size / min(w, h)
        image = image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        return (x.permute(2, 0, 1).float() / 255 - self.mean) / self.std  # (3, S, S)


class ToyBackbone(Backbone):
    """ToyCLIP behind the ``Backbone`` interface."""

    def __init__(self, model: ToyCLIP, tokenizer: ToyTokenizer, spec: str, mean: float, std: float) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eot_token_id = tokenizer.eot_id
        self.spec = spec
        cfg = model.cfg
        self.embed_dim, self.token_width, self.context_length = cfg.embed_dim, cfg.text_width, cfg.context_length
        self.preprocess = ToyPreprocess(cfg.image_size, mean, std)
        self.preprocess_id = f"toy:rgb-resize{cfg.image_size}-crop-norm({mean},{std})"

    @classmethod
    def from_dir(cls, folder: Path, spec: str, device: str = "cpu") -> ToyBackbone:
        weights, meta_path = folder / WEIGHTS_NAME, folder / META_NAME
        if not (weights.is_file() and meta_path.is_file()):
            raise WeightsNotAvailable(spec, [str(weights), str(meta_path)], "ToyCLIP folder incomplete")
        meta = json.loads(meta_path.read_text())
        cfg = ToyCLIPConfig(**meta["config"])
        model = ToyCLIP(cfg)
        model.load_state_dict(load_file(str(weights)))
        tok = ToyTokenizer(meta["words"], cfg.context_length)
        norm = meta["normalise"]
        return cls(model.to(device), tok, spec, norm["mean"], norm["std"])

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.text.embed_tokens(tokens.to(self.device))  # (M, L, W)

    def _text_forward(self, embeds: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        return self.model.text(embeds, eot_index.to(embeds.device))  # (M, D)

    def _image_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.visual(images)  # (B, D), (B, P, D)

    def text_stack(self) -> TextStack:
        text = self.model.text
        blocks = [PreNormBlock(b.ln_1, b.qkv, b.out, b.heads, b.ln_2, b.mlp) for b in text.blocks]
        return TextStack(text.positional_embedding, blocks, lambda x: text.ln_final(x) @ text.text_projection)

    def visual_prompt_site(self) -> nn.Module:
        return self.model.visual.ln_pre

    def visual_blocks(self) -> Sequence[nn.Module]:
        return list(self.model.visual.blocks)
