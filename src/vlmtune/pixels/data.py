"""Images for pixel-training methods: a label-free image set, augmented views, loaders, and the encoding pass.

``ImageSet`` is what a method may read: images by index, and labels only where the regime gives them (the
labelled shots of the semi-supervised regime). The unlabelled images a label-free method gets carry no labels:
the runner builds them from a copy of the split whose labels are all unknown (-1).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vlmtune.backbones.base import Backbone
from vlmtune.data.base import DatasetSplit
from vlmtune.data.sealed import ImageSource
from vlmtune.pixels.dist import dist_info


class ImageSet:
    """Images a method may read: ``image(i)`` -> RGB PIL image, ``len``, ``content_hash(i)``, and ``labels`` (N,)
    or None. The images come from an opaque ``ImageSource``: no path, sample id or split is in reach."""

    def __init__(self, source: ImageSource, labels: torch.Tensor | None) -> None:
        self.source, self.labels = source, labels

    @classmethod
    def unlabelled(cls, split: DatasetSplit) -> ImageSet:
        """The images of ``split`` with no labels (nor paths that name class folders) anywhere in reach."""
        return cls(ImageSource(split), None)

    @classmethod
    def labelled(cls, split: DatasetSplit) -> ImageSet:
        return cls(ImageSource(split), torch.as_tensor(split.labels, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.source)

    def image(self, i: int) -> Image.Image:
        return self.source.image(i)

    def content_hash(self, i: int) -> str:
        return self.source.content_hash(i)


class ViewDataset(Dataset):
    """Item i -> (i, view_1(image_i), ..., view_m(image_i)): several augmented views of one image."""

    def __init__(self, images: ImageSet, views: Sequence[Callable[[Image.Image], torch.Tensor]]) -> None:
        self.images, self.views = images, list(views)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        image = self.images.image(i)
        return (torch.tensor(i), *(v(image) for v in self.views))


class LabelledViews(Dataset):
    """Items of several image sets with (pseudo-)targets: item j -> (view(image), target), or with several views
    (view_1(image), ..., view_m(image), target). ``sources`` are (image set, positions (M,), targets (M,) or
    (M, K)) triples, concatenated in order; a target of -1 marks an image without one (contrastive terms only)."""

    def __init__(
        self,
        sources: Sequence[tuple[ImageSet, torch.Tensor, torch.Tensor]],
        view: Callable[[Image.Image], torch.Tensor] | Sequence[Callable[[Image.Image], torch.Tensor]],
    ) -> None:
        self.items = [
            (images, int(i), t) for images, index, targets in sources for i, t in zip(index, targets, strict=True)
        ]
        self.views = list(view) if isinstance(view, Sequence) else [view]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, ...]:
        images, i, target = self.items[j]
        image = images.image(i)
        return (*(v(image) for v in self.views), target)


class _Subset(Dataset):
    def __init__(self, data: Dataset, index: Sequence[int]) -> None:
        self.data, self.index = data, [int(i) for i in index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.data[self.index[i]]


def default_workers() -> int:
    """DataLoader workers per process: the cores this process may use less one for the training loop (at most 8);
    none with two cores or fewer, where a worker only competes with the training step (benchmarks/pixel_training)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores //= max(1, dist_info().world)
    return 0 if cores <= 2 else min(8, cores - 1)


def make_loader(
    data: Dataset,
    batch_size: int,
    *,
    index: Sequence[int] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    workers: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader over ``data`` (or its items at ``index``) sharded over the processes of a torchrun job.

    Sampling is DistributedSampler's in every case (one process = one shard), so a run on N processes with a
    per-process batch of B / N sees exactly the batches of a one-process run with batch B. Call
    ``loader.sampler.set_epoch(e)`` before each epoch for a new order."""
    info = dist_info()
    subset = _Subset(data, index) if index is not None else data
    sampler = DistributedSampler(
        subset, num_replicas=info.world, rank=info.rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    workers = default_workers() if workers is None else workers
    context = "fork" if workers > 0 and "fork" in mp.get_all_start_methods() else None
    return DataLoader(
        subset,
        batch_size=max(1, batch_size // info.world),
        sampler=sampler,
        num_workers=workers if context or workers == 0 else 0,
        multiprocessing_context=context,
        persistent_workers=bool(workers and context),
        pin_memory=pin_memory,
        drop_last=drop_last,
    )


@torch.no_grad()
def encode_all(
    encoder: Backbone,
    data: Dataset,
    *,
    index: Sequence[int] | None = None,
    batch_size: int = 256,
    workers: int | None = None,
    amp: bool | None = None,
) -> torch.Tensor:
    """Pooled, L2-normalised features (N, D) of every item of ``data`` (a ``ViewDataset`` with one view), or of
    its items at ``index``, through ``encoder`` (a tuned copy: pixels, not the cache), on the CPU. Sharded over
    the processes of a torchrun job and gathered, so every process returns the same full tensor."""
    info = dist_info()
    loader = make_loader(data, batch_size * info.world, index=index, shuffle=False, workers=workers)
    device = encoder.device
    use_amp = device.type == "cuda" if amp is None else amp
    rows, parts = [], []
    for item, images in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            feats = encoder.encode_images(images.to(device, non_blocking=True))
        rows.append(item)
        parts.append(torch.nn.functional.normalize(feats.float(), dim=-1))
    items = torch.cat(rows).to(device) if rows else torch.empty(0, dtype=torch.long, device=device)
    feats = torch.cat(parts) if parts else torch.empty(0, encoder.embed_dim, device=device)
    if info.active:
        all_items = [torch.empty_like(items) for _ in range(info.world)]
        all_feats = [torch.empty_like(feats) for _ in range(info.world)]
        dist.all_gather(all_items, items)
        dist.all_gather(all_feats, feats)
        items, feats = torch.cat(all_items), torch.cat(all_feats)
    order = torch.as_tensor(index if index is not None else range(len(data)), dtype=torch.long)
    position = torch.full((len(data),), -1, dtype=torch.long)
    position[order] = torch.arange(len(order))
    out = torch.empty(len(order), feats.shape[1], dtype=torch.float32)
    out[position[items.cpu()]] = feats.cpu()  # the sampler's padding repeats items: same features, written twice
    return out
