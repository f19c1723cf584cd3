"""Dataset splits as plain data: ids, labels, class names, templates, and a loader for one image."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlmtune.errors import CorruptImage

log = logging.getLogger(__name__)


def open_image(path: str | Path) -> Image.Image:
    """Decode an image file to RGB; a file that cannot be read raises ``CorruptImage`` naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise CorruptImage(str(path), str(exc)) from exc


@dataclass(frozen=True)
class DatasetSplit:
    """One split of a classification dataset.

    Attributes:
        dataset: dataset name, e.g. ``"caltech101"``, ``"toy:shapes-sketch"``, ``"folder:/data/cifar"``.
        split: ``"train"``, ``"val"`` or ``"test"`` (or a derived name such as ``"train@16shot-seed1"``).
        classnames: class names in label order.
        templates: prompt templates, the first is the dataset's single default.
        ids: stable sample identifiers (relative paths, or indices for generated data).
        labels: (N,) int64 labels.
        loader: index into ``ids`` -> RGB PIL image.
        paths: the image files, for splits backed by files (uploads send the original bytes), else None.
    """

    dataset: str
    split: str
    classnames: list[str]
    templates: list[str]
    ids: list[str]
    labels: np.ndarray
    loader: Callable[[int], Image.Image] = field(repr=False, compare=False)
    paths: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    _parent: tuple[int, ...] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def labelled(self) -> bool:
        """False when some labels are unknown (-1: a folder's ``unlabeled/`` images)."""
        return len(self.labels) == 0 or int(self.labels.min()) >= 0

    def image(self, i: int) -> Image.Image:
        return self.loader(self._parent[i] if self._parent is not None else i)

    def file_path(self, i: int) -> str | None:
        """The file of sample ``i`` (None for generated data)."""
        if self.paths is None:
            return None
        return self.paths[self._parent[i] if self._parent is not None else i]

    def subset(self, indices: Sequence[int] | np.ndarray, split: str | None = None) -> DatasetSplit:
        """The samples at ``indices`` (same classes), e.g. a few-shot pick."""
        idx = [int(i) for i in indices]
        parent = tuple(self._parent[i] for i in idx) if self._parent is not None else tuple(idx)
        return replace(
            self, split=split or self.split, ids=[self.ids[i] for i in idx], labels=self.labels[idx], _parent=parent
        )

    def relabel(self, keep_classes: Sequence[int], split: str | None = None) -> DatasetSplit:
        """Keep samples of ``keep_classes`` and relabel them 0..len(keep_classes)-1 in that order."""
        mapping = {c: i for i, c in enumerate(keep_classes)}
        idx = [i for i, y in enumerate(self.labels) if int(y) in mapping]
        sub = self.subset(idx, split)
        labels = np.array([mapping[int(y)] for y in sub.labels], dtype=np.int64)
        return replace(sub, classnames=[self.classnames[c] for c in keep_classes], labels=labels)

    def content_key(self) -> str:
        """Hash of (dataset, ids): the sample-set part of a feature-cache key."""
        h = hashlib.sha256(self.dataset.encode())
        for sid in self.ids:
            h.update(sid.encode() + b"\0")
        return h.hexdigest()[:16]


def files_split(
    dataset: str,
    split: str,
    root: Path,
    items: Sequence[tuple[str, int]],
    classnames: list[str],
    templates: list[str],
    skip_corrupt: bool = False,
) -> DatasetSplit:
    """A split backed by image files under ``root`` (``items`` = relative path, label)."""
    paths = [str(root / rel) for rel, _ in items]

    def load(i: int) -> Image.Image:
        return open_image(paths[i])

    split_obj = DatasetSplit(
        dataset,
        split,
        classnames,
        templates,
        [rel for rel, _ in items],
        np.array([y for _, y in items], dtype=np.int64),
        load,
        tuple(paths),
    )
    return drop_corrupt(split_obj) if skip_corrupt else split_obj


def drop_corrupt(split: DatasetSplit) -> DatasetSplit:
    """Decode every image once and drop those that fail, logging each and the count."""
    good: list[int] = []
    for i in range(len(split)):
        try:
            split.image(i)
            good.append(i)
        except CorruptImage as exc:
            log.warning("skipping unreadable image: %s", exc)
    if len(good) < len(split):
        log.warning(
            "%s/%s: skipped %d unreadable images of %d", split.dataset, split.split, len(split) - len(good), len(split)
        )
    return split.subset(good) if len(good) < len(split) else split
