"""Zero-shot CLIP (Radford et al., 2021): logits = s * cos(f_x, g_k) with g_k the text feature of a prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlmtune.backbones.base import Backbone, Capability, FeatureEncoder
from vlmtune.data.templates import check_template
from vlmtune.methods.api import Classifier, Method, Task
from vlmtune.methods.common.text import class_text_weights
from vlmtune.methods.options import method_config, option
from vlmtune.methods.registry import register_method


@method_config
class ZeroShotConfig:
    ensemble: bool = option(False, "average all task templates (CLIP prompt ensembling) instead of one")
    template: str = option("dataset", "the one template: 'dataset' = the dataset's own, or e.g. 'a photo of a {}.'")


class ZeroShotClassifier(Classifier):
    weights: torch.Tensor  # buffer (K, D)

    def __init__(
        self, classnames: Sequence[str], weights: torch.Tensor, scale: float, templates: Sequence[str]
    ) -> None:
        super().__init__(classnames)
        self.register_buffer("weights", weights)  # (K, D)
        self.scale = float(scale)
        self.templates = list(templates)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * features.float() @ self.weights.T  # (N, K)

    def for_classnames(self, classnames: Sequence[str], backbone: Backbone) -> ZeroShotClassifier:
        return ZeroShotClassifier(
            classnames, class_text_weights(backbone, classnames, self.templates), self.scale, self.templates
        )

    def extra_meta(self) -> dict[str, Any]:
        return {"scale": self.scale, "templates": self.templates}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> ZeroShotClassifier:
        return cls(meta["classnames"], tensors["weights"], meta["scale"], meta["templates"])


def zero_shot_classifier(
    encoder: FeatureEncoder, task: Task, ensemble: bool, template: str = "dataset"
) -> ZeroShotClassifier:
    """CLIP's zero-shot head: the task's first template (or ``template``), or the ensemble of all of them."""
    if ensemble:
        templates = task.templates
    else:
        templates = task.templates[:1] if template == "dataset" else [template]
        check_template(templates[0])
    weights = class_text_weights(encoder, task.classnames, templates)  # (K, D)
    return ZeroShotClassifier(task.classnames, weights, encoder.logit_scale, templates)


@register_method("zeroshot")
class ZeroShot(Method):
    """Zero-shot CLIP with the task's prompt template (or the template ensemble)."""

    capability = Capability.FEATURES
    config_cls = ZeroShotConfig
    classifier = ZeroShotClassifier
    needs_labels = False
    needs_train = False
    supports_new_classes = True
    summary = "zero-shot CLIP: single template or template ensemble"

    def fit(self, handle: Backbone, task: Task, *, generator: torch.Generator) -> ZeroShotClassifier:
        return zero_shot_classifier(handle, task, self.config.ensemble, self.config.template)
