"""The generated toy-world datasets (``toy:<task>``), held in memory as uint8 tensors."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from vlmtune.data.base import DatasetSplit
from vlmtune.data.registry import register_dataset
from vlmtune.toy.tasks import SPLIT_SIZES, TOY_TASKS, get_task


@lru_cache(maxsize=64)
def _generate(task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = get_task(task).generate(split)
    return images.permute(0, 2, 3, 1).contiguous().numpy(), labels.numpy()  # (N, S, S, 3) uint8, (N,)


def load_toy(task_name: str) -> dict[str, DatasetSplit]:
    task = get_task(task_name)
    out = {}
    for split in SPLIT_SIZES:

        def loader(i: int, split: str = split) -> Image.Image:
            return Image.fromarray(_generate(task_name, split)[0][i])

        labels = _generate(task_name, split)[1]
        ids = [f"{split}/{i:05d}" for i in range(len(labels))]
        out[split] = DatasetSplit(
            f"toy:{task_name}", split, task.classnames, list(task.templates), ids, labels.copy(), loader
        )
    return out


def _register(name: str) -> None:
    @register_dataset(f"toy:{name}", f"[{TOY_TASKS[name].role}] {TOY_TASKS[name].description}", family="toy")
    def _load(root: Path, skip_corrupt: bool) -> dict[str, DatasetSplit]:
        return load_toy(name)


for _name in TOY_TASKS:
    _register(_name)
