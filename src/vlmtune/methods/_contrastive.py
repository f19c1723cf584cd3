"""Contrastive fine-tuning of both towers (FLYP, LatteCLIP): the trainable copy, CLIP's loss, the adapter.

Both methods fine-tune the image and the text tower with CLIP's symmetric contrastive loss and predict with text
(or prototype) features against the fine-tuned image tower. The adapter carries the image tower only (a
``TowerClassifier`` with ``FULL`` tuning): the text tower's part ends in the head's class features, computed before
the text tower is reset to the base's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmtune.backbones.base import Backbone
from vlmtune.backbones.tuning import TowerTuning, tunable_copy
from vlmtune.schedule import Schedule

FULL = TowerTuning(mode="full")


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
