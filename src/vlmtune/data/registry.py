"""Dataset registry: ``load_dataset(name, root)`` -> ``{"train": DatasetSplit, "val": ..., "test": ...}``.

Names: registered real datasets (``caltech101``, ``imagenet_sketch``, ...), ``toy:<task>`` for the generated toy
world, ``folder:<path>`` for an image folder (``<root>/<class>/<image>``); any of them + ``@noisy=<spec>`` with
noisy train labels (``data.noisy``: ``pairflip-0.4``, ``cifar100n``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlmtune.data.base import DatasetSplit
from vlmtune.errors import UnknownName

Builder = Callable[[Path, bool], dict[str, DatasetSplit]]
KNOWN_SHAPES = "<registered name> | toy:<task> | folder:<path>"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    builder: Builder
    family: str


_REGISTRY: dict[str, DatasetInfo] = {}


def register_dataset(name: str, description: str, family: str = "coop") -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} registered twice")
        _REGISTRY[name] = DatasetInfo(name, description, fn, family)
        return fn

    return deco


def default_root() -> Path:
    """``$VLMTUNE_DATA`` or ``./data``: the folder that holds one sub-folder per dataset (CoOp's DATA)."""
    return Path(os.environ.get("VLMTUNE_DATA", "data")).expanduser()


def _ensure_loaded() -> None:
    from vlmtune.data import datasets  # noqa: F401  (registers the built-in datasets)


def list_datasets() -> list[DatasetInfo]:
    _ensure_loaded()
    return sorted(_REGISTRY.values(), key=lambda d: (d.family, d.name))


def load_dataset(name: str, root: str | Path | None = None, skip_corrupt: bool = False) -> dict[str, DatasetSplit]:
    """All splits of a dataset. Missing files raise ``DatasetNotFound`` saying where to put them."""
    from vlmtune.data.noisy import split_noisy_name, with_noisy_labels

    base, noise = split_noisy_name(name)
    if noise is not None:
        splits = load_dataset(base, root, skip_corrupt)
        return with_noisy_labels(splits, noise, Path(root) if root is not None else default_root())
    _ensure_loaded()
    if name.startswith("folder:"):
        from vlmtune.data.datasets.folder import load_image_folder

        return load_image_folder(Path(name.removeprefix("folder:")).expanduser(), skip_corrupt=skip_corrupt)
    if name not in _REGISTRY:
        raise UnknownName("dataset", name, [*_REGISTRY, "folder:<path>"])
    return _REGISTRY[name].builder(Path(root) if root is not None else default_root(), skip_corrupt)
