"""CIFAR-100 from its binary version (no pickle): ``<root>/cifar-100-binary/{train,test}.bin`` and
``fine_label_names.txt``, as extracted from https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz.

Each record is <coarse label byte><fine label byte><3072 bytes: R, G, B planes of 32 x 32>; the train file holds
the 50,000 train images in the order of the python version (torchvision's), which CIFAR-100N's labels follow
(``data.noisy`` checks it against the label file's clean labels). No val split: model selection uses none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vlmtune.data.base import DatasetSplit
from vlmtune.data.registry import register_dataset
from vlmtune.data.templates import DEFAULT_TEMPLATE, ENSEMBLE_TEMPLATES, clean_classname
from vlmtune.errors import DatasetNotFound

SOURCE = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz (extract it into the data root)"
RECORD = 2 + 3 * 32 * 32


def read_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-100 binary file -> images (N, 32, 32, 3) uint8 and fine labels (N,)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % RECORD:
        raise DatasetNotFound(f"{path} is not a CIFAR-100 binary file ({raw.size} bytes, records of {RECORD})")
    rows = raw.reshape(-1, RECORD)
    images = rows[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), rows[:, 1].astype(np.int64)


@register_dataset("cifar100", "CIFAR-100, 100 classes, 50,000 train / 10,000 test (binary version)", "other")
def load_cifar100(root: Path, skip_corrupt: bool) -> dict[str, DatasetSplit]:
    folder = root / "cifar-100-binary"
    names_file = folder / "fine_label_names.txt"
    if not names_file.is_file():
        raise DatasetNotFound(
            f"CIFAR-100 not found: expected {folder}/train.bin, test.bin, fine_label_names.txt ({SOURCE})"
        )
    classnames = [clean_classname(n) for n in names_file.read_text().split() if n.strip()]
    templates = [DEFAULT_TEMPLATE, *(t for t in ENSEMBLE_TEMPLATES if t != DEFAULT_TEMPLATE)]
    splits = {}
    for split in ("train", "test"):
        images, labels = read_cifar_bin(folder / f"{split}.bin")
        splits[split] = DatasetSplit(
            dataset="cifar100",
            split=split,
            classnames=classnames,
            templates=templates,
            ids=[str(i) for i in range(len(labels))],
            labels=labels,
            loader=lambda i, images=images: Image.fromarray(images[i]),
        )
    return splits
