"""Text-initialised linear probe on frozen image features (a CLIP-style probe: cosine logits, CLIP's scale).

W starts at the zero-shot text weights; logits = s * f_x . W_k / ||W_k|| + b_k with s the backbone's logit
scale; full-batch AdamW on cross-entropy plus lambda * ||W - W_0||^2, which keeps the probe near the zero-shot
solution when labels are few. lambda is chosen on the validation split (never on test) from ``reg_grid``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.backbones.base import Backbone, Capability
from vlmtune.features.extract import FeatureSet
from vlmtune.methods.api import Classifier, Method, Task
from vlmtune.methods.frozen.zeroshot import zero_shot_classifier
from vlmtune.methods.options import method_config, option
from vlmtune.methods.registry import register_method

log = logging.getLogger(__name__)


@method_config
class LinearProbeConfig:
    lr: float = option(1e-3, "AdamW learning rate", gt=0)
    steps: int = option(300, "full-batch AdamW steps per lambda", ge=1)
    reg_grid: tuple[float, ...] = option((0.0, 0.01, 0.1, 1.0), "lambdas of the pull to zero-shot, chosen on val")
    default_reg: float = option(0.01, "lambda when the task has no validation split", ge=0)
    ensemble: bool = option(False, "initialise from the template ensemble")
    bias: bool = option(True, "learn a per-class bias")


class LinearProbeClassifier(Classifier):
    def __init__(self, classnames: Sequence[str], weights: torch.Tensor, scale: float, bias: torch.Tensor) -> None:
        super().__init__(classnames)
        self.weight = nn.Parameter(weights.clone())  # (K, D)
        self.bias = nn.Parameter(bias.clone())  # (K,)
        self.scale = float(scale)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * features.float() @ F.normalize(self.weight, dim=-1).T + self.bias  # (N, K)

    def extra_meta(self) -> dict[str, Any]:
        return {"scale": self.scale}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> LinearProbeClassifier:
        return cls(meta["classnames"], tensors["weight"], meta["scale"], tensors["bias"])


def _accuracy(clf: Classifier, data: FeatureSet) -> float:
    with torch.no_grad():
        return float((clf.logits(data.features).argmax(-1) == data.labels).float().mean())


@register_method("linear_probe")
class LinearProbe(Method):
    """Linear probe initialised from zero-shot text weights (CLIP-style cosine logits)."""

    capability = Capability.FEATURES
    config_cls = LinearProbeConfig
    classifier = LinearProbeClassifier
    summary = "text-initialised linear probe, L2 pull to the zero-shot weights, lambda chosen on val"

    def _train(self, w0: torch.Tensor, scale: float, train: FeatureSet, reg: float, names: list[str]) -> Classifier:
        cfg = self.config
        clf = LinearProbeClassifier(names, w0, scale, torch.zeros(len(names)))
        clf.bias.requires_grad_(cfg.bias)
        opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
        x, y = train.features.float(), train.labels
        for step in range(cfg.steps):
            loss = F.cross_entropy(clf.logits(x), y) + reg * (clf.weight - w0).pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
                self.hooks.step(step + 1, cfg.steps, "step", loss=float(loss.detach()), reg=reg)
        return clf

    def fit(self, handle: Backbone, task: Task, *, generator: torch.Generator) -> Classifier:
        if task.train is None or len(task.train) == 0:
            raise ValueError("linear_probe needs labelled training features")
        assert isinstance(task.train, FeatureSet) and (task.val is None or isinstance(task.val, FeatureSet))
        zs = zero_shot_classifier(handle, task, self.config.ensemble)
        w0, scale = zs.weights, zs.scale
        if task.val is None or len(task.val) == 0:
            return self._train(w0, scale, task.train, self.config.default_reg, task.classnames)
        best: tuple[float, float, Classifier] | None = None
        for reg in self.config.reg_grid:
            clf = self._train(w0, scale, task.train, reg, task.classnames)
            acc = _accuracy(clf, task.val)
            log.info("linear_probe: lambda=%g val acc %.4f", reg, acc)
            if best is None or acc > best[0]:
                best = (acc, reg, clf)
        assert best is not None
        return best[2]
