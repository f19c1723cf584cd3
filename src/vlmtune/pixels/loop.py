"""The pixel training loop: epochs over a DataLoader, the schedule's optimiser, mixed precision on GPU, DDP.

A method wraps what it trains in a ``LossModule`` (its trainable parts as submodules, ``forward(*batch)`` = the
loss); ``train_pixels`` runs it unchanged in one process or under ``torchrun`` (the module is wrapped in
``DistributedDataParallel``, which averages the gradients of the processes' shards: a run on N processes with
batch B matches one process with batch B up to floating-point reduction order).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from vlmtune.pixels.dist import dist_info
from vlmtune.schedule import Schedule, make_optimizer, set_lr

EpochFn = Callable[[int], "dict[str, float] | None"]
StepHook = Callable[..., None]  # TrainingHooks.step(step, total, unit, **metrics)


class LossModule(nn.Module):
    """``parts`` (the modules whose parameters train) + ``loss(*batch) -> scalar`` as one module for DDP."""

    def __init__(self, parts: dict[str, nn.Module], loss: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.loss = loss

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.loss(*batch)


def train_pixels(
    module: LossModule,
    loader: DataLoader,
    schedule: Schedule,
    *,
    step: StepHook | None = None,
    on_epoch: EpochFn | None = None,
    after_step: Callable[[], None] | None = None,
    amp: bool | None = None,
    device: torch.device | None = None,
    seed: int | None = None,
) -> list[float]:
    """Minimise ``module(*batch)`` over ``schedule.epochs`` epochs of ``loader``; returns the mean loss per epoch.

    ``amp`` (default: on CUDA) runs the forward pass under bfloat16 autocast; ``after_step`` runs after every
    optimiser step (an EMA update); ``step`` receives (epoch, epochs, "epoch", loss=, lr=, **on_epoch(epoch)).
    ``seed``: the global RNG, which the augmentations (and DataLoader worker seeds) draw from, is seeded with it for
    the loop and restored after, so a method seeded by its generator trains the same way twice."""
    if seed is not None:
        with torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else []):
            torch.manual_seed(seed)
            return train_pixels(
                module, loader, schedule, step=step, on_epoch=on_epoch, after_step=after_step, amp=amp, device=device
            )
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter of the loss module requires a gradient")
    device = device or params[0].device
    use_amp = device.type == "cuda" if amp is None else amp
    info = dist_info()
    model: nn.Module = module
    if info.active:
        model = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer(params, schedule)
    losses = []
    for epoch in range(schedule.epochs):
        lr = set_lr(opt, schedule, epoch)
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        total = torch.zeros((), device=device)
        batches = 0
        for batch in loader:
            batch = [b.to(device, non_blocking=True) for b in batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = model(*batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            total += loss.detach().float()
            batches += 1
        losses.append(float(total) / max(1, batches))
        extra = (on_epoch(epoch) if on_epoch is not None else None) or {}
        if step is not None:
            step(epoch + 1, schedule.epochs, "epoch", loss=losses[-1], lr=lr, **extra)
    return losses
