"""FLYP (Goyal et al. 2023) and FLYP + pseudo-labels (LatteCLIP's baseline): "finetune like you pretrain".

Both towers fine-tuned with CLIP's contrastive loss between each image and the caption template(label); evaluation
with the zero-shot head of the fine-tuned text tower. ``flyp`` trains on the true labels (paper 004's oracle);
``flyp_pl`` on zero-shot pseudo-labels, ``labels=refresh`` recomputing them with the model being fine-tuned at every
step (paper 004: "recalculated after every weight update") or ``static`` (its code: the frozen model's labels).
``template=ensemble`` draws one of the dataset's templates per image and step (FLYP's one row per image and
template); the defaults follow LatteCLIP's comparison (a single template, the same schedule as LatteCLIP).
"""

from __future__ import annotations

from typing import Literal, cast

import torch

from vlmtune.backbones.base import Backbone
from vlmtune.capabilities import Capability
from vlmtune.errors import VlmtuneError
from vlmtune.methods.api import Method, Task
from vlmtune.methods.common.text import class_text_weights
from vlmtune.methods.common.tower import TowerClassifier
from vlmtune.methods.labelfree.base import PSEUDO_TEMPLATE_DOC, pseudo_templates
from vlmtune.methods.labelfree.contrastive import (
    ContrastiveConfig,
    EpochLabels,
    both_towers,
    clip_loss,
    fit_both_towers,
    frozen_pseudo_labels,
    tower_adapter,
)
from vlmtune.methods.options import method_config, option
from vlmtune.methods.registry import register_method
from vlmtune.pixels import ImageSet


@method_config
class FLYPConfig(ContrastiveConfig):
    template: str = option("a photo of a {}.", PSEUDO_TEMPLATE_DOC + " (captions and the evaluation head)")


@method_config
class FLYPPLConfig(FLYPConfig):
    labels: Literal["refresh", "static"] = option(
        "refresh", "pseudo-labels recomputed by the model being fine-tuned at every step (paper 004), or the frozen "
        "model's (its code)"
    )  # fmt: skip


class FLYPClassifier(TowerClassifier):
    """The fine-tuned text tower's class features as a cosine head on the fine-tuned image tower."""


class _Contrastive(Method):
    capability = Capability.WHITE_BOX
    default_shots = 0

    def wants_images(self) -> bool:
        return True

    def _train(
        self,
        handle: Backbone,
        task: Task,
        images: ImageSet,
        targets: torch.Tensor,
        generator: torch.Generator,
        relabel: bool = False,
    ) -> TowerClassifier:
        """Fine-tune on (image, template(class)) pairs; ``targets`` (N,) are classes, or with ``relabel`` the
        fallback labels replaced at every step by the fine-tuned model's zero-shot prediction."""
        cfg = self.config
        templates = pseudo_templates(task, cfg.template)
        tuned = both_towers(handle, generator)
        k = task.num_classes
        tokens = tuned.tokenize([t.format(c) for t in templates for c in task.classnames]).to(tuned.device)  # (T K, L)
        relabelled = EpochLabels(self.hooks)

        def loss(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            f = tuned.encode_images(x)  # (B, D)
            y = targets.to(pos.device)[pos]
            if relabel:
                with torch.no_grad():
                    g = tuned.encode_tokens(tokens).view(len(templates), k, -1).mean(0)  # (K, D)
                    y = (f.float() @ torch.nn.functional.normalize(g.float(), dim=-1).T).argmax(-1)
                relabelled.record(pos, y)
            pick = torch.randint(len(templates), (len(y),), device=y.device) * k + y  # one template per image
            return clip_loss(f, tuned.encode_tokens(tokens[pick]).to(f.dtype), handle.logit_scale)

        index = torch.arange(len(targets))
        fit_both_towers(tuned, [(images, index, index)], loss, cfg, generator, self.hooks, on_epoch=relabelled.on_epoch)
        weights = class_text_weights(tuned, task.classnames, templates)  # the fine-tuned text tower's zero-shot head
        return tower_adapter(cast(type[TowerClassifier], self.classifier), task.classnames, weights, tuned, handle)


@register_method("flyp")
class FLYP(_Contrastive):
    """FLYP on the true labels (LatteCLIP's supervised oracle; default: the whole train split)."""

    config_cls = FLYPConfig
    classifier = FLYPClassifier
    summary = "FLYP: both towers fine-tuned contrastively on (image, template(label)) pairs, zero-shot head"

    def fit(self, handle: Backbone, task: Task, *, generator: torch.Generator) -> TowerClassifier:
        if task.train_images is None or task.train_images.labels is None:
            raise VlmtuneError("flyp trains on labelled images: run it through the runner (Task.train_images)")
        return self._train(handle, task, task.train_images, task.train_images.labels, generator)


@register_method("flyp_pl")
class FLYPPL(_Contrastive):
    """FLYP on zero-shot pseudo-labels (paper 004's FLYP + pseudo-label baseline)."""

    config_cls = FLYPPLConfig
    classifier = TowerClassifier
    needs_labels = False
    summary = "FLYP + pseudo-labels: FLYP on zero-shot labels, refreshed by the model being fine-tuned (paper 004)"

    def fit(self, handle: Backbone, task: Task, *, generator: torch.Generator) -> TowerClassifier:
        _, c_zs = frozen_pseudo_labels(
            "flyp_pl", handle, task, pseudo_templates(task, self.config.template), self.hooks
        )
        assert task.images is not None
        return self._train(handle, task, task.images, c_zs, generator, relabel=self.config.labels == "refresh")
