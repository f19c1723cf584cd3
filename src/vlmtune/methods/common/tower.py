"""Adapters that tuned the image tower, and the pseudo-label training round on pixels that makes them.

``TowerClassifier`` scores features of a tuned copy of the backbone (``image_encoder``) with a head: class text
features (a cosine classifier) or a linear head. It carries the tower as a state delta against the base
(``backbones.tuning.tower_state``: the tensors that differ, by value) plus the base's fingerprint: loading it on
another base is refused. Its features are cached under the tuned copy's own fingerprint.

``train_tower_round`` is the visual counterpart of a CoOp round on pseudo-labels: a fresh tunable copy (VPT,
LayerNorm-only or full), cross-entropy of s * cos(f(x), g_c) on augmented views of the pseudo-labelled images
(+ labelled shots), the epoch that is best on held-out pseudo-labels kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.backbones.base import Backbone
from vlmtune.backbones.tuning import (
    StackedTowers,
    TowerTuning,
    restore_tower,
    tower_state,
    trainable_parameters,
    tunable_copy,
)
from vlmtune.errors import VlmtuneError
from vlmtune.methods.api import Classifier, Task, TrainingHooks
from vlmtune.methods.common.pseudo import PseudoLabels
from vlmtune.methods.common.text import class_text_weights
from vlmtune.pixels import ImageSet, LabelledViews, LossModule, ViewDataset, encode_all, make_loader, train_pixels
from vlmtune.pixels import view as make_view
from vlmtune.schedule import Schedule

TOWER_PREFIX = "tower."


class TowerClassifier(Classifier):
    """A head (K, D) on the image features of a tuned tower; ``settings``: scale, cosine (text features of
    ``templates``) or a linear head, tuning, base_fingerprint."""

    def __init__(
        self,
        classnames: Sequence[str],
        weight: torch.Tensor,
        settings: dict[str, Any],
        tower: dict[str, torch.Tensor],
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__(classnames)
        self.weight = nn.Parameter(weight.detach().float().clone())  # (K, D)
        self.bias = nn.Parameter(bias.detach().float().clone() if bias is not None else torch.zeros(len(classnames)))
        self.settings = dict(settings)
        self.tower = dict(tower)
        self._encoder: tuple[Backbone, Backbone] | None = None  # (base, its tuned copy)

    @classmethod
    def from_tuned(
        cls,
        classnames: Sequence[str],
        weight: torch.Tensor,
        settings: dict[str, Any],
        tuned: Backbone,
        base: Backbone,
        tuning: TowerTuning,
    ) -> TowerClassifier:
        settings = {**settings, "tuning": tuning.to_json(), "base_fingerprint": base.fingerprint()}
        clf = cls(classnames, weight, settings, tower_state(tuned, base))
        tuned.model.requires_grad_(False)
        clf._encoder = (base, tuned)
        return clf

    @property
    def tuning(self) -> TowerTuning:
        return TowerTuning(**self.settings["tuning"])

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features.float(), dim=-1).to(self.weight.device)  # (N, D)
        w = F.normalize(self.weight, dim=-1) if self.settings.get("cosine", True) else self.weight
        with torch.no_grad():
            return (float(self.settings["scale"]) * f @ w.T + self.bias).cpu()  # (N, K)

    def image_encoder(self, backbone: Backbone) -> Backbone:
        if self._encoder is not None and self._encoder[0] is backbone:
            return self._encoder[1]
        expected = self.settings["base_fingerprint"]
        if backbone.fingerprint() != expected:
            raise VlmtuneError(
                f"this {self.method} adapter tuned the image tower of a backbone with fingerprint {expected}; "
                f"{backbone.spec} has {backbone.fingerprint()} (load the backbone it was trained on)"
            )
        tuned = restore_tower(backbone, self.tuning, self.tower)
        self._encoder = (backbone, tuned)
        return tuned

    def for_classnames(self, classnames: Sequence[str], backbone: Backbone) -> TowerClassifier:
        templates = self.settings.get("templates")
        if not templates or not self.settings.get("cosine", True):
            raise NotImplementedError(f"{self.method}: a trained linear head cannot describe new class names")
        weight = class_text_weights(backbone, classnames, templates)  # (K', D)
        clf = type(self)(classnames, weight, self.settings, self.tower)
        clf._encoder = self._encoder
        return clf

    def extra_meta(self) -> dict[str, Any]:
        return {"settings": self.settings}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {TOWER_PREFIX + k: v for k, v in self.tower.items()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> TowerClassifier:
        tower = {k.removeprefix(TOWER_PREFIX): v for k, v in tensors.items() if k.startswith(TOWER_PREFIX)}
        return cls(meta["classnames"], tensors["weight"], meta["settings"], tower, tensors.get("bias"))


class TowerHead(nn.Module):
    """Logits s * W f(x) / |f(x)| + b of a tower's pooled features (B, D) -> (B, K): ``cosine`` = fixed class
    features (W normalised, b = 0, nothing trains), else a linear head W, b trained with the tower, initialised
    with the class features and zeros (so it starts at their zero-shot logits); ``bias=False`` keeps b at 0."""

    def __init__(self, weights: torch.Tensor, scale: float, cosine: bool, bias: bool = True) -> None:
        super().__init__()
        self.scale, self.cosine = float(scale), cosine
        self.linear = nn.Linear(weights.shape[1], weights.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weights)
            self.linear.bias.zero_()
        self.linear.requires_grad_(not cosine)
        self.linear.bias.requires_grad_(not cosine and bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.linear.weight, dim=-1) if self.cosine else self.linear.weight
        return self.scale * F.normalize(feats.float(), dim=-1) @ w.T + self.linear.bias  # (B, K)

    def to_classifier(
        self,
        cls: type[TowerClassifier],
        classnames: Sequence[str],
        templates: Sequence[str],
        tuned: Backbone,
        base: Backbone,
        tuning: TowerTuning,
    ) -> TowerClassifier:
        """The adapter: this head on ``tuned`` (stored as a delta against ``base``)."""
        settings = {"scale": self.scale, "cosine": self.cosine, "templates": list(templates)}
        clf = cls.from_tuned(classnames, self.linear.weight.detach().cpu(), settings, tuned, base, tuning)
        with torch.no_grad():
            clf.bias.copy_(self.linear.bias.detach().cpu())
        return clf


class TowerEnsemble(Classifier):
    """M tower adapters of one base whose softmax probabilities are averaged (CoFT's two fine-tuned towers):
    its image encoder is ``StackedTowers`` of the members' tuned copies, whose features (N, M * D) it splits
    again; ``logits`` are the log of the averaged probabilities (same argmax), or with ``average = "logits"`` the
    mean of the members' logits (ReCLIP). Subclasses set ``member_cls``."""

    member_cls: ClassVar[type[TowerClassifier]] = TowerClassifier
    average: ClassVar[str] = "probabilities"

    def __init__(self, classnames: Sequence[str], members: Sequence[TowerClassifier]) -> None:
        super().__init__(classnames)
        self.members = nn.ModuleList(members)
        self._encoder: tuple[Backbone, StackedTowers] | None = None

    def towers(self) -> list[TowerClassifier]:
        """The members, typed (``nn.ModuleList`` yields plain modules)."""
        return cast(list[TowerClassifier], list(self.members))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        parts = [F.normalize(p, dim=-1) for p in features.float().chunk(len(self.members), dim=-1)]  # M x (N, D)
        logits = torch.stack([m.logits(f) for m, f in zip(self.towers(), parts, strict=True)])  # (M, N, K)
        if self.average == "logits":
            return logits.mean(0)
        return logits.softmax(-1).mean(0).clamp_min(1e-12).log()  # (N, K)

    def image_encoder(self, backbone: Backbone) -> Backbone:
        if self._encoder is None or self._encoder[0] is not backbone:
            towers = [m.image_encoder(backbone) for m in self.towers()]
            self._encoder = (backbone, StackedTowers(towers))
        return self._encoder[1]

    def extra_meta(self) -> dict[str, Any]:
        return {"members": [m.extra_meta() for m in self.towers()]}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {f"member{i}.{k}": v for i, m in enumerate(self.towers()) for k, v in m.extra_tensors().items()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> TowerEnsemble:
        members = []
        for i, member_meta in enumerate(meta["members"]):
            own = {k.removeprefix(f"members.{i}."): v for k, v in tensors.items() if k.startswith(f"members.{i}.")}
            own |= {k.removeprefix(f"member{i}."): v for k, v in tensors.items() if k.startswith(f"member{i}.")}
            members.append(cls.member_cls.from_state(own, {"classnames": meta["classnames"], **member_meta}))
        return cls(meta["classnames"], members)


def draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def pseudo_sources(task: Task, pseudo: PseudoLabels) -> list[tuple[ImageSet, torch.Tensor, torch.Tensor]]:
    """``LabelledViews`` sources: the pseudo-labelled unlabelled images, plus the labelled shots of the
    semi-supervised regime with their true labels."""
    assert task.images is not None
    sources = [(task.images, pseudo.index, pseudo.labels)]
    shots = task.train_images
    if shots is not None and shots.labels is not None:
        sources.append((shots, torch.arange(len(shots)), shots.labels))
    return sources


def tower_scores(clf: TowerClassifier, base: Backbone, images: ImageSet, workers: int | None = None) -> torch.Tensor:
    """Logits (N, K) of every image of ``images`` through the adapter's tuned tower (no augmentation)."""
    encoder = clf.image_encoder(base)
    feats = encode_all(encoder, ViewDataset(images, [make_view("none", encoder)]), workers=workers)  # (N, D)
    return clf.logits(feats)


def train_tower_round(
    cls: type[TowerClassifier],
    base: Backbone,
    task: Task,
    train: PseudoLabels,
    val: PseudoLabels,
    tuning: TowerTuning,
    schedule: Schedule,
    generator: torch.Generator,
    hooks: TrainingHooks,
    *,
    templates: Sequence[str],
    head: str | TowerHead = "text",
    augment: str = "none",
    workers: int | None = None,
    weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> TowerClassifier:
    """A fresh tuned tower trained with CE on the pseudo-labelled images ``train`` (+ ``task.train_images``); the
    epoch best on ``val`` (accuracy on its pseudo-labels) kept. ``head="text"``: logits s * cos(f(x), g_c) against
    the fixed class text features of ``templates``; ``"linear"``: a linear head W f(x) / |f(x)| * s + b initialised
    with those text features (W) and zeros (b), trained with the tower; or a ready ``TowerHead`` (LaFTer's text
    classifier). ``weights`` (K, D) replace the templates' text features (CoFT: its positive prompts')."""
    if task.images is None:
        raise VlmtuneError("this method trains on pixels: the runner gives Task.images (run it through the runner)")
    if isinstance(head, str) and head not in ("text", "linear"):
        raise VlmtuneError(f"unknown head {head!r} (text or linear)")
    tuned = tunable_copy(base, tuning, generator, note=hooks.note)
    device = tuned.device
    if isinstance(head, TowerHead):
        classify = head.to(device)
    else:
        if weights is None:
            weights = class_text_weights(base, task.classnames, templates)  # (K, D)
        classify = TowerHead(weights, base.logit_scale, cosine=head == "text").to(device)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = classify(tuned.encode_images(x))  # (B, K)
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)

    data = LabelledViews(pseudo_sources(task, train), make_view(augment, tuned))
    loader = make_loader(data, schedule.batch_size, seed=draw_seed(generator), workers=workers)
    params = trainable_parameters(tuned) + [p for p in classify.parameters() if p.requires_grad]
    best: dict[str, Any] = {"acc": -1.0, "state": None}
    on_epoch = None
    if len(val) > 0:
        plain = ViewDataset(task.images, [make_view("none", tuned)])

        def on_epoch(epoch: int) -> dict[str, float]:
            feats = encode_all(tuned, plain, index=val.index.tolist(), workers=workers).to(device)  # (V, D)
            with torch.no_grad():
                acc = float((classify(feats).argmax(1).cpu() == val.labels).float().mean())
            if acc > best["acc"]:
                best.update(acc=acc, state=[p.detach().clone() for p in params])
            return {"pseudo_val_acc": 100 * acc}

    module = LossModule({"tower": tuned.model, "head": classify}, loss)
    train_pixels(module, loader, schedule, step=hooks.step, on_epoch=on_epoch, device=device, seed=draw_seed(generator))
    if best["state"] is not None:
        with torch.no_grad():
            for p, kept in zip(params, best["state"], strict=True):
                p.copy_(kept)
    return classify.to_classifier(cls, task.classnames, templates, tuned, base, tuning)
