"""CoCoOp: conditional context optimisation (Zhou et al., CVPR 2022; TMM paper Eq. 3).

A Meta-Net (Linear-ReLU-Linear, D -> D/16 -> W) maps the image feature to a residual r(x) added to every context
vector, v_k(x) = v_k + r(x); P(y = i | x) = softmax_i(s * cos(f_x, G(p_i(x)))). Defaults of the paper: 4 context
vectors initialised from "a photo of a", SGD lr 0.002, 10 epochs, batch size 1. The paper is limited to batch 1
because each image needs its own K prompts; here all B x K prompts of a batch go through the text tower together,
and ``batch_size=B`` scales the lr by B (linear scaling rule) unless ``scale_lr=false``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.methods._options import method_config, option
from vlmtune.methods._prompt import TOKEN_SCALE_DOC, Position, mlp
from vlmtune.methods._prompt_clf import PromptClassifier, PromptMethod
from vlmtune.methods.base import register_method


@method_config
class CoCoOpConfig:
    n_ctx: int = option(4, "context vectors", ge=1)
    ctx_init: str | None = option("a photo of a", "initial words (n_ctx must equal their token count); none = random")
    position: Position = option("end", "class token position")
    lr: float = option(0.002, "SGD learning rate at batch 1 (CLIP's token-embedding scale)", gt=0)
    epochs: int | None = option(10, "epochs; none = by shots", ge=1)
    batch_size: int = option(1, "images per step (the paper's 1; all B x K prompts in one text-tower pass)", ge=1)
    scale_lr: bool = option(True, "batch_size > 1: lr x batch_size (linear scaling rule)")
    token_scale: float | None = option(None, TOKEN_SCALE_DOC, gt=0)


class CoCoOpClassifier(PromptClassifier):
    @classmethod
    def build_head(cls, settings: dict[str, Any]) -> nn.Module:
        return mlp(settings["embed_dim"], settings["width"])  # Meta-Net

    def forward_logits(self, features: torch.Tensor, patches: torch.Tensor | None) -> torch.Tensor:
        assert self.head is not None
        f = F.normalize(features, dim=-1)  # (B, D)
        ctx = self.ctx[None] + self.head(f)[:, None, :]  # v_k(x) = v_k + r(x): (B, n, W)
        k = len(self.classnames)
        text = self.assembler.encode(ctx[:, None].expand(-1, k, -1, -1))  # G(p_i(x)): (B, K, D)
        return self.scale * torch.einsum("bd,bkd->bk", f, text)  # Eq. (3)


@register_method("cocoop")
class CoCoOp(PromptMethod):
    """CoCoOp: image-conditioned prompt context (Meta-Net residual), batched over images and classes."""

    config_cls = CoCoOpConfig
    paper_batch = 1
    classifier = CoCoOpClassifier
    summary = "CoCoOp: Meta-Net image-conditioned context, batched (no batch-size-1 limit)"
