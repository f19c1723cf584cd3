"""Several processes (``torchrun``): the process group from the environment, and the rank / world of this one.

``torchrun --nproc_per_node N -m vlmtune fit ...`` starts N copies of the same run; the runner calls
``init_from_env`` (NCCL on CUDA, gloo on CPU), each process trains on its shard of every epoch (DistributedSampler)
with gradients averaged by DDP, and only rank 0 writes the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1


def dist_info() -> DistInfo:
    """This process's place in the process group (rank 0 of 1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def is_main() -> bool:
    return dist_info().rank == 0


def init_from_env(device: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (a no-op for one process).

    Returns this process's ``DistInfo``; on CUDA each process takes the GPU of its local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return dist_info()
    if not dist.is_initialized():
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist_info()


def device_for(device: str) -> str:
    """The device of this process: ``cuda`` becomes ``cuda:<local rank>`` under torchrun."""
    info = dist_info()
    if info.active and device in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{info.local_rank}"
    return device
