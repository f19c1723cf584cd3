"""UPL: unsupervised prompt learning (Huang et al., 2022).

Zero-shot CLIP labels the unlabelled images with the dataset's template (Eq. (1)); per class the 16 images
predicted as that class with the highest logit are kept (UPL's top-K rule); a CoOp prompt (16 random context
tokens, the class token at the end) is trained on them with cross-entropy. UPL's schedule: SGD lr 0.002, batch 32,
50 epochs, one constant warm-up epoch at 1e-5, cosine. Test: the prompt, or with ``ensemble=16`` the average
logits of 16 prompts trained from different seeds (UPL's test-time prompt ensemble). Trained on cached features
(no random-resized-crop / flip augmentation: docs/fidelity.md).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, cast

import torch

from vlmtune.backbones.base import Backbone
from vlmtune.features.extract import FeatureSet
from vlmtune.methods.api import Task
from vlmtune.methods.common.pseudo import PseudoLabels, top_k_per_class
from vlmtune.methods.labelfree.base import PseudoLabelClassifier, PseudoLabelPrompting, PseudoPromptConfig
from vlmtune.methods.options import method_config, option
from vlmtune.methods.registry import register_method


@method_config
class UPLConfig(PseudoPromptConfig):
    shots: int = option(16, "pseudo-labels per class: the top-K most confident images predicted as it", ge=1)
    rank_by: Literal["logit", "prob"] = option("logit", "confidence for the top-K: raw max logit (UPL) or softmax")
    lr: float = option(0.002, "SGD learning rate", gt=0)
    epochs: int = option(50, "epochs", ge=1)
    batch_size: int = option(32, "images per step", ge=1)
    weight_decay: float = option(5e-4, "SGD weight decay", ge=0)
    warmup_epochs: int = option(1, "constant warm-up epochs at 1e-5", ge=0)
    ensemble: int = option(1, "prompts trained from different seeds whose logits are averaged (UPL's test: 16)", ge=1)


@register_method("upl")
class UPL(PseudoLabelPrompting):
    """UPL: CoOp on the top-16 zero-shot pseudo-labels per class; optional prompt ensemble at test."""

    config_cls = UPLConfig
    classifier = PseudoLabelClassifier
    summary = "UPL: CoOp on top-16 zero-shot pseudo-labels per class (label-free), optional 16-prompt ensemble"
    presets: ClassVar[dict[str, dict[str, Any]]] = {"paper": {"ensemble": 16}}

    def select(self, scores: torch.Tensor, round: int, rounds: int) -> PseudoLabels:
        ranked = scores if self.config.rank_by == "logit" else scores.softmax(dim=1)
        return top_k_per_class(ranked, self.config.shots)

    def train_round(
        self,
        handle: Backbone,
        task: Task,
        feats: torch.Tensor,
        pseudo: PseudoLabels,
        labelled: FeatureSet | None,
        generator: torch.Generator,
    ) -> PseudoLabelClassifier:
        """``ensemble`` prompts trained in turn on the same pseudo-labels, stacked into one classifier."""
        train_one = super().train_round
        members = [
            cast(PseudoLabelClassifier, train_one(handle, task, feats, pseudo, labelled, generator))
            for _ in range(self.config.ensemble)
        ]
        if len(members) == 1:
            return members[0]
        settings = {**members[0].settings, "ensemble": len(members)}
        ctx = torch.stack([m.ctx.detach() for m in members])  # (E, n, W)
        return PseudoLabelClassifier(task.classnames, ctx, settings).bind(handle)
