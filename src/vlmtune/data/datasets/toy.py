"""The generated toy-world datasets (``toy:<task>``), held in memory as uint8 tensors.

``toy:<task>-pool`` (label-free variants of the shifted tasks) has the same classes, val and test split, and a
large train split (4,000 images: 400 per class for the shapes tasks, 200 for ToyNet's) generated from its own seed:
the unlabelled pool of the label-free regime (the runner hides its labels).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from vlmtune.data.base import DatasetSplit
from vlmtune.data.registry import register_dataset
from vlmtune.toy.tasks import SPLIT_SIZES, TOY_TASKS, get_task

POOL_IMAGES = 4000  # train images of a ``-pool`` variant
POOL_TASKS = ("shapes-noisy", "shapes-pixel", "shapes-sketch", "toynet-noisy", "toynet-pixel", "toynet-sketch")
POOL_TASKS += ("shapes-blurry", "toynet-blurry")  # the label-free benchmark (docs/label_free.md)


@lru_cache(maxsize=64)
def _generate(task: str, split: str, n_per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = get_task(task).generate(split, n_per_class)
    return images.permute(0, 2, 3, 1).contiguous().numpy(), labels.numpy()  # (N, S, S, 3) uint8, (N,)


def load_toy(task_name: str, pool: bool = False) -> dict[str, DatasetSplit]:
    task = get_task(task_name)
    name = f"toy:{task_name}-pool" if pool else f"toy:{task_name}"
    out = {}
    for split in SPLIT_SIZES:
        # the pool's train split is a different generation (split "pool"), its val / test are the task's own
        key, n = ("pool", POOL_IMAGES // len(task.classes)) if pool and split == "train" else (split, None)

        def loader(i: int, key: str = key, n: int | None = n) -> Image.Image:
            return Image.fromarray(_generate(task_name, key, n)[0][i])

        labels = _generate(task_name, key, n)[1]
        ids = [f"{key}/{i:05d}" for i in range(len(labels))]
        out[split] = DatasetSplit(name, split, task.classnames, list(task.templates), ids, labels.copy(), loader)
    return out


def _register(name: str, pool: bool = False) -> None:
    task = TOY_TASKS[name]
    if pool:
        per_class = POOL_IMAGES // len(task.classes)
        key, doc = f"toy:{name}-pool", f"[label-free] {task.description}; {per_class} unlabelled train images per class"
    else:
        key, doc = f"toy:{name}", f"[{task.role}] {task.description}"

    @register_dataset(key, doc, family="toy")
    def _load(root: Path, skip_corrupt: bool) -> dict[str, DatasetSplit]:
        return load_toy(name, pool)


for _name in TOY_TASKS:
    _register(_name)
for _name in POOL_TASKS:
    _register(_name, pool=True)
