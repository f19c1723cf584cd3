"""Learning-rate schedules and the optimiser they drive, shared by the feature-space and pixel training loops."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["Schedule", "make_optimizer", "set_lr"]


@dataclass(frozen=True)
class Schedule:
    """SGD with momentum, warm-up, then cosine decay.

    ``warmup="constant"``: ``warmup_epochs`` at ``warmup_lr``, then cosine over the whole schedule (Dassl's
    ConstantWarmupScheduler: CoOp / CoCoOp / TMM / UPL). ``"linear"``: the rate rises linearly from 0 to ``lr`` over
    ``warmup_epochs``, then cosine over the remaining epochs (IFPL / GRIP's WarmupCosineSchedule, CPL).
    """

    lr: float = 0.002
    epochs: int = 10
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    warmup: Literal["constant", "linear"] = "constant"
    optimizer: Literal["sgd", "adamw"] = "sgd"  # AdamW (LaFTer, LatteCLIP) ignores ``momentum``
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW (open_clip's training: (0.9, 0.98))
    eps: float = 1e-8  # AdamW (open_clip's training: 1e-6)
    decay_matrices_only: bool = False  # weight decay on parameters with >= 2 dimensions only (open_clip)
    decay: Literal["cosine", "constant"] = "cosine"  # after warm-up: cosine decay, or a constant rate (LaFTer, ReCLIP)

    def lr_at(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.warmup_lr if self.warmup == "constant" else self.lr * epoch / self.warmup_epochs
        if self.decay == "constant":
            return self.lr
        if self.warmup == "constant":
            return 0.5 * self.lr * (1 + math.cos(math.pi * epoch / self.epochs))
        done = (epoch - self.warmup_epochs) / max(1, self.epochs - self.warmup_epochs)
        return 0.5 * self.lr * (1 + math.cos(math.pi * done))


def make_optimizer(params: list[nn.Parameter], schedule: Schedule) -> torch.optim.Optimizer:
    """The optimiser ``schedule`` names, at its base rate (``set_lr`` moves it each epoch)."""
    groups: list[dict] = [{"params": params, "weight_decay": schedule.weight_decay}]
    if schedule.decay_matrices_only:  # gains, biases, embeddings of rank 1 decay-free (open_clip's main.py)
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": schedule.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
    if schedule.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=schedule.lr, betas=schedule.betas, eps=schedule.eps)
    return torch.optim.SGD(groups, lr=schedule.lr, momentum=schedule.momentum)


def set_lr(optimizer: torch.optim.Optimizer, schedule: Schedule, epoch: int) -> float:
    """Set every group's rate to ``schedule.lr_at(epoch)`` and return it."""
    lr = schedule.lr_at(epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
