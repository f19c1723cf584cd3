"""Few-shot picks and base/new class splits: pure functions of their inputs."""

from __future__ import annotations

import math

import numpy as np

from vlmtune.data.base import DatasetSplit


def few_shot_indices(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of ``k`` samples per class (all of a class when it has fewer), sorted; pure in (labels, k, seed).

    Each class draws from its own generator seeded by (seed, class), so adding a class never changes
    the picks of the others.
    """
    labels = np.asarray(labels)
    picks: list[np.ndarray] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng = np.random.default_rng([seed, int(c)])
        picks.append(rng.choice(members, size=min(k, len(members)), replace=False))
    return np.sort(np.concatenate(picks)) if picks else np.empty(0, dtype=np.int64)


def few_shot(split: DatasetSplit, k: int, seed: int) -> DatasetSplit:
    """A ``k``-shot subset of ``split`` (name records k and seed)."""
    return split.subset(few_shot_indices(split.labels, k, seed), split=f"{split.split}@{k}shot-seed{seed}")


def base_new_classes(num_classes: int) -> tuple[list[int], list[int]]:
    """CoOp's rule: the first ceil(n/2) class ids are base, the rest new."""
    m = math.ceil(num_classes / 2)
    return list(range(m)), list(range(m, num_classes))


def base_new_split(split: DatasetSplit, subsample: str) -> DatasetSplit:
    """Keep ``subsample`` = ``"base"``, ``"new"`` or ``"all"`` classes, relabelled from 0 (CoOp's subsample_classes)."""
    if subsample == "all":
        return split
    base, new = base_new_classes(split.num_classes)
    if subsample not in ("base", "new"):
        raise ValueError(f"subsample must be 'all', 'base' or 'new', not {subsample!r}")
    return split.relabel(base if subsample == "base" else new, split=f"{split.split}@{subsample}")
