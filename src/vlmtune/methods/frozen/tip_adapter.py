"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): a training-free cache model over few-shot features.

Keys F (NK, D) = the training images' features, values L (NK, K) = their one-hot labels. For a test feature f:
    logits = s * f W^T + alpha * exp(-beta * (1 - f F^T)) L
with W the zero-shot text weights. alpha and beta are searched on the validation split only (the reference's
grid: beta in [0.1, 7), 200 steps; alpha in [0.1, 3), 20 steps). Tip-Adapter-F also fine-tunes the keys
(AdamW lr 1e-3, eps 1e-4, cosine, 20 epochs, batch 256) with alpha, beta at their initial values, then searches.
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
class TipAdapterConfig:
    init_alpha: float = option(1.0, "residual ratio alpha before the search", ge=0)
    init_beta: float = option(1.0, "sharpness beta before the search", gt=0)
    search_scale: tuple[float, float] = option((7.0, 3.0), "upper ends of the beta, alpha search (reference grid)")
    search_step: tuple[int, int] = option((200, 20), "grid steps of the beta, alpha search")
    ensemble: bool = option(False, "zero-shot weights from the template ensemble")


@method_config
class TipAdapterFConfig(TipAdapterConfig):
    lr: float = option(1e-3, "AdamW learning rate of the cache keys", gt=0)
    epochs: int = option(20, "fine-tuning epochs", ge=1)
    batch_size: int = option(256, "images per step", ge=1)


class TipAdapterClassifier(Classifier):
    weights: torch.Tensor  # buffers: (K, D) text weights, (NK, K) one-hot cache values
    values: torch.Tensor

    def __init__(
        self,
        classnames: Sequence[str],
        weights: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        scale: float,
        alpha: float,
        beta: float,
    ) -> None:
        super().__init__(classnames)
        self.register_buffer("weights", weights)  # (K, D) zero-shot text weights
        self.keys = nn.Parameter(keys.clone())  # (NK, D) cache keys
        self.register_buffer("values", values)  # (NK, K) one-hot
        self.scale, self.alpha, self.beta = float(scale), float(alpha), float(beta)

    def parts(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-shot logits (N, K) and cache affinities f F^T (N, NK)."""
        f = features.float()
        return self.scale * f @ self.weights.T, f @ F.normalize(self.keys, dim=-1).T

    @staticmethod
    def combine(zs: torch.Tensor, affinity: torch.Tensor, values: torch.Tensor, alpha: float, beta: float):
        return zs + alpha * torch.exp(-beta * (1 - affinity)) @ values

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        zs, affinity = self.parts(features)
        return self.combine(zs, affinity, self.values, self.alpha, self.beta)

    def extra_meta(self) -> dict[str, Any]:
        return {"scale": self.scale, "alpha": self.alpha, "beta": self.beta}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> TipAdapterClassifier:
        return cls(
            meta["classnames"],
            tensors["weights"],
            tensors["keys"],
            tensors["values"],
            meta["scale"],
            meta["alpha"],
            meta["beta"],
        )


def search_alpha_beta(clf: TipAdapterClassifier, val: FeatureSet | None, cfg: TipAdapterConfig) -> None:
    """Set alpha, beta to the reference grid's best on the validation split (unchanged without one)."""
    if val is None or len(val) == 0:
        return
    (beta_top, alpha_top), (beta_n, alpha_n) = cfg.search_scale, cfg.search_step
    betas = [i * (beta_top - 0.1) / beta_n + 0.1 for i in range(beta_n)]
    alphas = [i * (alpha_top - 0.1) / alpha_n + 0.1 for i in range(alpha_n)]
    with torch.no_grad():
        zs, affinity = clf.parts(val.features)
        best = (-1.0, clf.alpha, clf.beta)
        for beta in betas:
            cache = torch.exp(-beta * (1 - affinity)) @ clf.values  # (N, K)
            for alpha in alphas:
                acc = float(((zs + alpha * cache).argmax(-1) == val.labels).float().mean())
                if acc > best[0]:
                    best = (acc, alpha, beta)
    log.info("tip-adapter: val acc %.4f at alpha=%.3f beta=%.3f", *best)
    clf.alpha, clf.beta = best[1], best[2]


def _build(cls: type[TipAdapterClassifier], backbone: Backbone, task: Task, cfg: TipAdapterConfig):
    train = task.train
    if not isinstance(train, FeatureSet) or len(train) == 0:
        raise ValueError("tip_adapter needs labelled training features")
    zs = zero_shot_classifier(backbone, task, cfg.ensemble)
    values = F.one_hot(train.labels, task.num_classes).float()  # (NK, K)
    return cls(task.classnames, zs.weights, train.features.float(), values, zs.scale, cfg.init_alpha, cfg.init_beta)


@register_method("tip_adapter")
class TipAdapter(Method):
    """Tip-Adapter: training-free key-value cache of few-shot features, alpha/beta chosen on val."""

    capability = Capability.FEATURES
    config_cls = TipAdapterConfig
    classifier = TipAdapterClassifier
    summary = "Tip-Adapter: training-free cache model (alpha, beta searched on val)"

    def fit(self, handle: Backbone, task: Task, *, generator: torch.Generator) -> TipAdapterClassifier:
        clf = _build(TipAdapterClassifier, handle, task, self.config)
        search_alpha_beta(clf, task.val if isinstance(task.val, FeatureSet) else None, self.config)
        return clf


@register_method("tip_adapter_f")
class TipAdapterF(Method):
    """Tip-Adapter-F: the cache keys fine-tuned with cross-entropy, then alpha/beta chosen on val."""

    capability = Capability.FEATURES
    config_cls = TipAdapterFConfig
    classifier = TipAdapterClassifier
    summary = "Tip-Adapter-F: cache keys fine-tuned (AdamW, cosine), alpha/beta searched on val"

    def fit(self, handle: Backbone, task: Task, *, generator: torch.Generator) -> TipAdapterClassifier:
        cfg = self.config
        clf = _build(TipAdapterClassifier, handle, task, cfg)
        train = task.train
        assert isinstance(train, FeatureSet)
        opt = torch.optim.AdamW([clf.keys], lr=cfg.lr, eps=1e-4)
        steps = cfg.epochs * -(-len(train) // cfg.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        x, y = train.features.float(), train.labels
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(y), generator=generator)
            total = 0.0
            for start in range(0, len(y), cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                loss = F.cross_entropy(clf.logits(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            self.hooks.step(epoch + 1, cfg.epochs, "epoch", loss=total / len(y))
        search_alpha_beta(clf, task.val if isinstance(task.val, FeatureSet) else None, cfg)
        return clf
