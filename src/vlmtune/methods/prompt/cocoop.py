"""CoCoOp: conditional context optimisation (Zhou et al., CVPR 2022; TMM paper Eq. 3).

A Meta-Net (Linear-ReLU-Linear, D -> D/16 -> W) maps the image feature to a residual r(x) added to every context
vector, v_k(x) = v_k + r(x); P(y = i | x) = softmax_i(s * cos(f_x, G(p_i(x)))). Defaults of the paper: 4 context
vectors initialised from "a photo of a", SGD lr 0.002, 10 epochs, batch size 1. The paper is limited to batch 1
because each image needs its own K prompts; here all B x K prompts of a batch go through the text tower together,
and ``batch_size=B`` scales the lr by B (linear scaling rule) unless ``scale_lr=false``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.methods.common.prompt import mlp
from vlmtune.methods.common.prompt_classifier import ImagePromptConfig, PromptClassifier, PromptMethod
from vlmtune.methods.options import method_config
from vlmtune.methods.registry import register_method


@method_config
class CoCoOpConfig(ImagePromptConfig):
    """CoCoOp's defaults are those of the image-conditioned prompt learners (shared with TMM)."""


class CoCoOpClassifier(PromptClassifier):
    prompts_per_image: ClassVar[bool] = True  # K prompts per image: a pass is bounded by eval_prompts

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
