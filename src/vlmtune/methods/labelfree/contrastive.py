"""Contrastive fine-tuning of both towers (FLYP, LatteCLIP): the trainable copy, CLIP's loss, the adapter.

Both methods fine-tune the image and the text tower with CLIP's symmetric contrastive loss and predict with text
(or prototype) features against the fine-tuned image tower. The adapter carries the image tower only (a
``TowerClassifier`` with ``FULL`` tuning): the text tower's part ends in the head's class features, computed before
the text tower is reset to the base's weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from vlmtune.backbones.base import Backbone
from vlmtune.backbones.tuning import TowerTuning, tunable_copy
from vlmtune.methods.api import Task, TrainingHooks
from vlmtune.methods.common.text import class_text_weights
from vlmtune.methods.common.tower import TowerClassifier, TowerHead, draw_seed
from vlmtune.methods.labelfree.base import unlabeled_of
from vlmtune.methods.options import method_config, option
from vlmtune.pixels import ImageSet, LabelledViews, LossModule, make_loader, train_pixels
from vlmtune.pixels import view as make_view
from vlmtune.schedule import Schedule

FULL = TowerTuning(mode="full")
Augment = Literal["none", "flip-crop", "mocov2", "latteclip", "fixmatch-weak", "fixmatch-strong"]


@method_config
class ContrastiveConfig:
    """The schedule both contrastive fine-tuners share (LatteCLIP's paper settings; FLYP+PL uses the same)."""

    lr: float = option(1e-7, "AdamW learning rate (LatteCLIP: 1e-7; 1e-6 for Food101 and SUN397)", gt=0)
    batch_size: int = option(512, "batch size (LatteCLIP)", ge=2)
    iterations: int = option(2000, "training length: min(iterations, max_epochs epochs) (LatteCLIP)", ge=1)
    max_epochs: int = option(50, "see iterations (LatteCLIP)", ge=1)
    weight_decay: float = option(0.2, "AdamW weight decay on matrices (open_clip)", ge=0)
    warmup_epochs: int = option(0, "linear warm-up epochs (LatteCLIP states none; its code warms up some steps)", ge=0)
    augment: Augment = option("latteclip", "training views (LatteCLIP's code: RRC 0.9-1 + colour jitter + grey)")
    workers: int | None = option(None, "DataLoader workers per process (none = cores - 1, <= 8; 0 on <= 2 cores)", ge=0)


def both_towers(base: Backbone, generator: torch.Generator) -> Backbone:
    """A copy of ``base`` whose image and text towers train (the logit scale stays at the base's)."""
    tuned = tunable_copy(base, FULL, generator)
    tuned.model.requires_grad_(True)
    scale = getattr(tuned.model, "logit_scale", None)
    if isinstance(scale, torch.nn.Parameter):
        scale.requires_grad_(False)
    return tuned


def image_tower_only(tuned: Backbone, base: Backbone) -> Backbone:
    """Reset everything but the image tower of ``tuned`` to ``base``'s weights (in place): the adapter's state delta
    then holds the image tower alone."""
    tower = {id(p) for p in tuned.image_tower().parameters()} | {id(b) for b in tuned.image_tower().buffers()}
    base_state = base.model.state_dict()
    named = dict(tuned.model.named_parameters()) | dict(tuned.model.named_buffers())
    with torch.no_grad():
        for name, tensor in named.items():
            if id(tensor) not in tower and name in base_state:
                tensor.copy_(base_state[name])
    tuned.model.requires_grad_(False)
    return tuned


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """CLIP's symmetric loss (LatteCLIP Eq. 3, FLYP): image (N, D) and text (N, D) features, pair i is row i."""
    logits = scale * image @ text.T  # (N, N)
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def open_clip_adamw(lr: float, epochs: int, batch_size: int, weight_decay: float, warmup_epochs: int) -> Schedule:
    """open_clip's fine-tuning optimiser: AdamW (0.9, 0.98), eps 1e-6, decay on matrices only, cosine (LatteCLIP
    "OpenCLIP defaults", FLYP)."""
    return Schedule(
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        warmup="linear",
        optimizer="adamw",
        betas=(0.9, 0.98),
        eps=1e-6,
        decay_matrices_only=True,
    )


def epochs_for(n_images: int, batch_size: int, iterations: int, max_epochs: int) -> int:
    """min(``iterations`` steps, ``max_epochs`` epochs) as whole epochs (LatteCLIP: min{2000 iterations, 50 epochs})."""
    per_epoch = max(1, -(-n_images // batch_size))
    return max(1, min(max_epochs, -(-iterations // per_epoch)))


def frozen_pseudo_labels(
    method: str, handle: Backbone, task: Task, templates: Sequence[str], hooks: TrainingHooks
) -> tuple[torch.Tensor, torch.Tensor]:
    """(class text features (K, D), the frozen model's labels (N,) of the unlabelled images), the labels reported to
    the runner as round 0 (``zero-shot``)."""
    weights = class_text_weights(handle, task.classnames, templates)  # (K, D)
    labels = (unlabeled_of(task, method).features.float().cpu() @ weights.T).argmax(-1)  # (N,)
    hooks.pseudo_labels(0, "all", torch.arange(len(labels)), labels, "zero-shot")
    return weights, labels


class EpochLabels:
    """The latest pseudo-label each image got from the model being fine-tuned (its training view), reported to the
    runner at the end of every epoch with ``source`` (nothing when none was recorded)."""

    def __init__(self, hooks: TrainingHooks, source: str = "fine-tuned") -> None:
        self.hooks, self.source = hooks, source
        self.latest: dict[int, int] = {}

    def record(self, index: torch.Tensor, labels: torch.Tensor) -> None:
        self.latest.update(zip(index.tolist(), labels.tolist(), strict=True))

    def on_epoch(self, epoch: int) -> dict[str, float]:
        if self.latest:
            idx = sorted(self.latest)
            labels = torch.tensor([self.latest[i] for i in idx])
            self.hooks.pseudo_labels(epoch + 1, "all", torch.tensor(idx), labels, self.source)
        return {}


def fit_both_towers(
    tuned: Backbone,
    sources: Sequence[tuple[ImageSet, torch.Tensor, torch.Tensor]],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    cfg: ContrastiveConfig,
    generator: torch.Generator,
    hooks: TrainingHooks,
    *,
    after_step: Callable[[], None] | None = None,
    on_epoch: Callable[[int], dict[str, float]] | None = None,
) -> None:
    """Train ``tuned`` (both towers) on ``loss(views, targets)`` over the ``LabelledViews`` of ``sources`` with
    open_clip's AdamW for min(iterations, max_epochs epochs)."""
    data = LabelledViews(sources, make_view(cfg.augment, tuned))
    loader = make_loader(data, cfg.batch_size, seed=draw_seed(generator), workers=cfg.workers)
    epochs = epochs_for(len(data), cfg.batch_size, cfg.iterations, cfg.max_epochs)
    schedule = open_clip_adamw(cfg.lr, epochs, cfg.batch_size, cfg.weight_decay, cfg.warmup_epochs)
    train_pixels(
        LossModule({"model": tuned.model}, loss), loader, schedule, step=hooks.step, on_epoch=on_epoch,
        after_step=after_step, device=tuned.device, seed=draw_seed(generator),
    )  # fmt: skip


def tower_adapter(
    cls: type[TowerClassifier], classnames: Sequence[str], weights: torch.Tensor, tuned: Backbone, base: Backbone
) -> TowerClassifier:
    """The adapter: class features ``weights`` (K, D) as a cosine head on the fine-tuned image tower alone."""
    head = TowerHead(F.normalize(weights.detach().float(), dim=-1).cpu(), base.logit_scale, cosine=True)
    return head.to_classifier(cls, classnames, (), image_tower_only(tuned, base), base, FULL)
