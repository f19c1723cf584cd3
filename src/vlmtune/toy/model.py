"""ToyCLIP: a small CLIP with the same anatomy as OpenAI CLIP / open_clip.

ViT image tower (class token, ``ln_pre``, pre-norm blocks, ``ln_post``, projection) and a causal text
transformer pooled at the end-of-text token (token embedding, positional embedding, ``ln_final``,
``text_projection``), joined by a learned logit scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ToyCLIPConfig:
    image_size: int = 32
    patch_size: int = 4
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    embed_dim: int = 128
    vocab_size: int = 256
    context_length: int = 20
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class Block(nn.Module):
    """Pre-norm transformer block (attention + 4x MLP)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, w = x.shape  # (B, N, W)
        q, k, v = self.qkv(self.ln_1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, N, W/H)
        x = x + self.out(att.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.ln_2(x))


class VisionTower(nn.Module):
    def __init__(self, cfg: ToyCLIPConfig) -> None:
        super().__init__()
        w = cfg.vision_width
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.conv1 = nn.Conv2d(3, w, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(n_patches + 1, w) * w**-0.5)
        self.ln_pre = nn.LayerNorm(w)
        self.blocks = nn.ModuleList(Block(w, cfg.vision_heads) for _ in range(cfg.vision_layers))
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.randn(w, cfg.embed_dim) * w**-0.5)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S) normalised -> pooled (B, D) and patch tokens (B, P, D), unnormalised."""
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, P, W)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + self.positional_embedding  # (B, 1+P, W)
        x = self.ln_pre(x)
        for blk in self.blocks:
            x = blk(x, causal=False)
        x = self.ln_post(x) @ self.proj  # (B, 1+P, D)
        return x[:, 0], x[:, 1:]


class TextTower(nn.Module):
    def __init__(self, cfg: ToyCLIPConfig) -> None:
        super().__init__()
        w = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, w) * 0.01)
        self.blocks = nn.ModuleList(Block(w, cfg.text_heads) for _ in range(cfg.text_layers))
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(torch.randn(w, cfg.embed_dim) * w**-0.5)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens)  # (N, L, W)

    def forward(self, embeds: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Token embeddings (N, L, W) + EOT positions (N,) -> text features (N, D), unnormalised."""
        x = embeds + self.positional_embedding[: embeds.shape[1]]
        for blk in self.blocks:
            x = blk(x, causal=True)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), eot_index] @ self.text_projection  # (N, D)


class ToyCLIP(nn.Module):
    def __init__(self, cfg: ToyCLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg)
        self.text = TextTower(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
