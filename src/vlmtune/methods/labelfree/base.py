"""The loop shared by the label-free textual-prompt methods (UPL, IFPL, GRIP, CPL).

Each round: score the unlabelled images (round 1: zero-shot CLIP, Eq. (1); later rounds: the previous round's
prompt), select pseudo-labels by the method's rule, re-initialise a CoOp prompt and train it on them (plus the
labelled shots of the semi-supervised regime), keeping the epoch that is best on a held-out part of the
pseudo-labels when the method validates. Every selection is reported through ``hooks.pseudo_labels``: the runner,
which alone holds the hidden labels, measures their accuracy.

Methods subclass ``PseudoLabelPrompting`` and define ``select(scores, round) -> PseudoLabels``.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch

from vlmtune.backbones.base import Backbone
from vlmtune.capabilities import Capability
from vlmtune.data.templates import check_template
from vlmtune.errors import VlmtuneError
from vlmtune.features.extract import FeatureSet, UnlabeledFeatures
from vlmtune.methods.api import Classifier, Method, Task
from vlmtune.methods.common.prompt import TOKEN_SCALE_DOC, Schedule
from vlmtune.methods.common.prompt_classifier import (
    PromptClassifier,
    new_prompt_classifier,
    prompt_settings,
    train_prompt_classifier,
)
from vlmtune.methods.common.pseudo import PseudoLabels, split_validation, training_set, zero_shot_logits
from vlmtune.methods.common.tower import TowerClassifier, tower_scores
from vlmtune.methods.options import method_config, option

PSEUDO_TEMPLATE_DOC = "pseudo-labelling template: 'dataset' = the dataset's own, 'ensemble' = all, or e.g. 'a {}.'"


@method_config
class PseudoPromptConfig:
    """The options every label-free textual-prompt method shares (its schedule fields follow in each subclass)."""

    template: str = option("dataset", PSEUDO_TEMPLATE_DOC)
    n_ctx: int = option(16, "context vectors", ge=1)
    ctx_init: str | None = option(None, "initial words (n_ctx must equal their token count); none = N(0, 0.02)")
    token_scale: float | None = option(None, TOKEN_SCALE_DOC, gt=0)


def unlabeled_of(task: Task, method: str) -> UnlabeledFeatures:
    """The task's unlabelled images, or a one-line error."""
    if task.unlabeled is None or len(task.unlabeled) == 0:
        raise VlmtuneError(f"{method} adapts from unlabelled images: the task has none (a train split is needed)")
    return task.unlabeled


def pseudo_templates(task: Task, template: str) -> list[str]:
    """The templates of the zero-shot pseudo-labeller."""
    if template == "ensemble":
        return list(task.templates)
    chosen = task.templates[0] if template == "dataset" else template
    check_template(chosen)
    return [chosen]


class PseudoLabelClassifier(PromptClassifier):
    """A CoOp prompt learned from pseudo-labels; ``ensemble`` > 1 averages the logits of E prompts (UPL's
    test-time prompt ensemble): ``ctx`` (E, n, W)."""

    def _members(self) -> int:
        return int(self.settings.get("ensemble", 1))

    def text_features(self) -> torch.Tensor:
        if self._members() == 1:
            return super().text_features()
        return torch.stack([self.assembler.encode(c) for c in self.ctx])  # (E, K, D)

    def forward_logits(self, features: torch.Tensor, patches: torch.Tensor | None) -> torch.Tensor:
        if self._members() == 1:
            return super().forward_logits(features, patches)
        f = torch.nn.functional.normalize(features, dim=-1)  # (B, D)
        return (self.scale * torch.einsum("bd,ekd->ebk", f, self.text_features())).mean(0)  # (B, K)


class PseudoLabelPrompting(Method):
    """Iterative pseudo-labelling with a re-initialised CoOp prompt each round (textual modality).

    Configs have ``n_ctx``, ``ctx_init``, ``lr``, ``epochs``, ``batch_size``, ``weight_decay``, ``warmup_epochs``,
    ``template``; subclasses set ``warmup``, ``iterations`` / ``validation`` (attributes or config fields) and
    ``select``.
    """

    capability = Capability.WHITE_BOX
    needs_labels = False
    default_shots = 0
    supports_new_classes = True
    warmup: ClassVar[str] = "constant"

    # ---- what a method defines ---------------------------------------------------------------------------
    def select(self, scores: torch.Tensor, round: int, rounds: int) -> PseudoLabels:
        """Pseudo-labels from the current scores (N, K) (logits) in ``round`` (0-based) of ``rounds``."""
        raise NotImplementedError

    def rounds(self) -> int:
        return int(getattr(self.config, "iterations", 1))

    def validation_fraction(self) -> float:
        return float(getattr(self.config, "validation", 0.0))

    # ---- the shared loop ---------------------------------------------------------------------------------
    def schedule(self) -> Schedule:
        cfg = self.config
        return Schedule(
            lr=cfg.lr,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            weight_decay=cfg.weight_decay,
            warmup_epochs=cfg.warmup_epochs,
            warmup=self.warmup,  # type: ignore[arg-type]
        )

    def fit(self, handle: Backbone, task: Task, *, generator: torch.Generator) -> Classifier:
        unlabeled = unlabeled_of(task, self.name)
        feats = unlabeled.features.float()  # (N, D)
        labelled = task.train if isinstance(task.train, FeatureSet) else None
        scores = zero_shot_logits(handle, task.classnames, pseudo_templates(task, self.config.template), feats)
        everything = torch.arange(len(feats))
        self.hooks.pseudo_labels(0, "all", everything, scores.argmax(1))
        rounds = self.rounds()
        clf: Classifier | None = None
        for r in range(rounds):
            pseudo = self.select(scores, r, rounds)
            if len(pseudo) == 0:
                raise VlmtuneError(f"{self.name}: no image was selected for pseudo-labelling (round {r + 1})")
            self.hooks.pseudo_labels(r + 1, "selected", pseudo.index, pseudo.labels)
            clf = self.train_round(handle, task, feats, pseudo, labelled, generator)
            if r + 1 < rounds:  # relabel all of U with the new prompt for the next round
                scores = self.relabel(clf, handle, task, feats)
                self.hooks.pseudo_labels(r + 1, "all", everything, scores.argmax(1))
        assert clf is not None
        return clf

    def relabel(self, clf: Classifier, handle: Backbone, task: Task, feats: torch.Tensor) -> torch.Tensor:
        """Scores (N, K) of every unlabelled image under the round's model (from pixels if it tuned the tower)."""
        if isinstance(clf, TowerClassifier):
            assert task.images is not None
            return tower_scores(clf, handle, task.images, getattr(self.config, "workers", None))
        return clf.logits(feats)

    def train_round(
        self,
        handle: Backbone,
        task: Task,
        feats: torch.Tensor,
        pseudo: PseudoLabels,
        labelled: FeatureSet | None,
        generator: torch.Generator,
    ) -> Classifier:
        """A new prompt trained on ``pseudo`` (+ labelled shots); the best epoch on the held-out pseudo-labels."""
        train, val = split_validation(pseudo, self.validation_fraction(), generator)
        data, targets = training_set(feats, train, labelled, task.num_classes)
        cls = self.classifier
        assert issubclass(cls, PseudoLabelClassifier)
        settings = prompt_settings(handle, self.config.n_ctx, "end", self.config.token_scale)
        clf = new_prompt_classifier(cls, handle, task.classnames, settings, self.config.ctx_init, generator)
        best: dict[str, Any] = {"acc": -1.0, "state": None}
        on_epoch = None
        if len(val) > 0:
            vf, vl = feats[val.index], val.labels

            def on_epoch(epoch: int) -> dict[str, float]:
                acc = float((clf.logits(vf).argmax(1) == vl).float().mean())
                if acc > best["acc"]:
                    best.update(acc=acc, state=copy.deepcopy(clf.state_dict()))
                return {"pseudo_val_acc": 100 * acc}

        train_prompt_classifier(clf, handle, data, self.schedule(), generator, self.hooks, targets, on_epoch)
        if best["state"] is not None:
            clf.load_state_dict(best["state"])
        return clf
