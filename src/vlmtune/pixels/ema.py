"""Momentum (EMA) encoders and a MoCo queue (He et al. 2020; MoCo v2), for the contrastive and teacher-student
label-free methods (CoFT+, LatteCLIP).

``EMAEncoder`` keeps theta_k <- m * theta_k + (1 - m) * theta_q over the trainable parameters of a model through
``torch.optim.swa_utils.AveragedModel`` (buffers copied); ``MoCoQueue`` is the fixed-size FIFO of normalised keys
that supplies the negatives of the InfoNCE loss.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from vlmtune.pixels.dist import dist_info


class EMAEncoder(nn.Module):
    """A frozen exponential moving average of ``model``: ``update(model)`` after each step; call it as the model."""

    def __init__(self, model: nn.Module, momentum: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        # AveragedModel's first update copies the weights; later ones average with decay = momentum
        ema = get_ema_multi_avg_fn(momentum)
        self.average = AveragedModel(copy.deepcopy(model), multi_avg_fn=ema, use_buffers=True)
        self.average.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.average.update_parameters(model)

    @property
    def module(self) -> nn.Module:
        return self.average.module

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        with torch.no_grad():
            return self.average(*args, **kwargs)


class MoCoQueue:
    """A FIFO of K normalised keys (K, d), initialised with random unit vectors as in MoCo."""

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.keys = F.normalize(torch.randn(size, dim, generator=generator), dim=1)  # (K, d)
        self.pointer = 0

    def to(self, device: torch.device | str) -> MoCoQueue:
        self.keys = self.keys.to(device)
        return self

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Enqueue a batch of keys (B, d), replacing the oldest (gathered from every process under torchrun)."""
        keys = F.normalize(keys.detach().to(self.keys), dim=1)
        if dist_info().active:
            parts = [torch.empty_like(keys) for _ in range(dist_info().world)]
            dist.all_gather(parts, keys)
            keys = torch.cat(parts)
        size = self.keys.shape[0]
        keys = keys[-size:]
        idx = (self.pointer + torch.arange(keys.shape[0], device=keys.device)) % size
        self.keys[idx] = keys
        self.pointer = int((self.pointer + keys.shape[0]) % size)

    def logits(self, queries: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
        """InfoNCE logits (B, 1 + K): the positive key first, then the queue (all divided by ``temperature``);
        the target of every row is 0. The queue enters as a copy, so ``push`` may follow before the backward pass."""
        q = F.normalize(queries, dim=1)
        pos = (q * F.normalize(positives, dim=1)).sum(1, keepdim=True)  # (B, 1)
        neg = q @ self.keys.T.clone().to(q)  # (B, K)
        return torch.cat([pos, neg], 1) / temperature
