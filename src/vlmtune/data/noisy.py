"""Noisy training labels (the noisy-label protocol, paper 003 Table 2): ``<dataset>@noisy=<spec>`` is the dataset
with the labels of its train split replaced (val and test keep the true ones).

Specs:

- ``pairflip-R``: structured, class-dependent noise: each train label moves to the next class (c -> c + 1 mod K)
  with probability R (Han et al. 2018's pair flip; on ToyNet the next class is usually the same shape's other
  texture, the confusion a human labeller makes), drawn with a fixed seed (``pairflip-R-sS`` for seed S);
- ``cifar100n``: CIFAR-100N's human labels (``noisy_label`` of ``CIFAR-100_human.pt``, UCSC-REAL/cifar-10-100n)
  from ``<data root>/cifar-100/CIFAR-100_human.pt`` (where DeFT reads it), or ``cifar100n:<file>``; for the
  ``cifar100`` dataset, whose train order is checked against the file's ``clean_label``.

``CIFAR-100_human.pt`` is a ``torch.save`` of numpy arrays: it is read with ``torch.load(weights_only=True)`` and
only numpy's array-rebuilding functions allow-listed, so no other object can be unpickled from it.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from vlmtune.data.base import DatasetSplit
from vlmtune.errors import VlmtuneError

NOISY_SEP = "@noisy="
CIFAR100N_KEYS = ("clean_label", "noisy_label", "noisy_coarse_label", "clean_coarse_label")
_PAIRFLIP = re.compile(r"pairflip-(?P<rate>0(\.\d+)?|1(\.0+)?)(-s(?P<seed>\d+))?")


def split_noisy_name(name: str) -> tuple[str, str | None]:
    """``"toy:toynet-pool@noisy=pairflip-0.4"`` -> ``("toy:toynet-pool", "pairflip-0.4")``."""
    base, sep, spec = name.partition(NOISY_SEP)
    return base, (spec if sep else None)


def pairflip(labels: np.ndarray, num_classes: int, rate: float, seed: int = 0) -> np.ndarray:
    """Each label becomes (label + 1) mod K with probability ``rate`` -> noisy labels (N,)."""
    rng = np.random.default_rng(seed)
    flip = rng.random(len(labels)) < rate
    return np.where(flip, (labels + 1) % num_classes, labels).astype(np.int64)


def _numpy_globals() -> list[object]:
    """What ``torch.load(weights_only=True)`` needs to rebuild plain numpy arrays, and nothing else."""
    import numpy

    core = getattr(numpy, "_core", None) or numpy.core  # numpy 2 / 1
    allowed: list[object] = [core.multiarray._reconstruct, numpy.ndarray, numpy.dtype]
    allowed += [type(numpy.dtype(t)) for t in ("int64", "int32", "int16", "int8", "uint8", "float32", "float64")]
    return allowed


def read_cifar100n(path: str | Path) -> dict[str, np.ndarray]:
    """The label arrays of ``CIFAR-100_human.pt`` (keys ``CIFAR100N_KEYS``), without unpickling anything else."""
    import pickle

    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise VlmtuneError(
            f"CIFAR-100N labels not found at {path}: download CIFAR-100_human.pt from "
            "https://github.com/UCSC-REAL/cifar-10-100n (data/) and put it there"
        )
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            data = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VlmtuneError(f"{path} is not a CIFAR-100N label file of numpy arrays ({first})") from None
    if not isinstance(data, dict) or "noisy_label" not in data:
        raise VlmtuneError(f"{path}: expected a dict with {', '.join(CIFAR100N_KEYS)}")
    arrays = {k: v for k, v in data.items() if k in CIFAR100N_KEYS}
    if not all(isinstance(v, np.ndarray | torch.Tensor) and v.ndim == 1 for v in arrays.values()):
        raise VlmtuneError(f"{path} is not a CIFAR-100N label file of numpy arrays (its labels are no 1-d arrays)")
    return {k: np.asarray(v, dtype=np.int64) for k, v in arrays.items()}


def noisy_train_labels(train: DatasetSplit, spec: str, root: Path) -> np.ndarray:
    """The noisy labels (N,) of ``train`` that ``spec`` names."""
    match = _PAIRFLIP.fullmatch(spec)
    if match:
        return pairflip(train.labels, train.num_classes, float(match["rate"]), int(match["seed"] or 0))
    if spec == "cifar100n" or spec.startswith("cifar100n:"):
        file = Path(spec.partition(":")[2]) if ":" in spec else root / "cifar-100" / "CIFAR-100_human.pt"
        labels = read_cifar100n(file)
        if len(labels["noisy_label"]) != len(train):
            raise VlmtuneError(
                f"{file} has {len(labels['noisy_label'])} labels; {train.dataset}'s train split has {len(train)} "
                "images (CIFAR-100N labels the 50,000 CIFAR-100 train images)"
            )
        if "clean_label" in labels and not np.array_equal(labels["clean_label"], train.labels):
            raise VlmtuneError(
                f"{file}: its clean labels differ from {train.dataset}'s train labels: the images are not in "
                "CIFAR-100's train order (use the cifar100 dataset)"
            )
        return labels["noisy_label"]
    raise VlmtuneError(f"unknown label noise {spec!r} (pairflip-R, pairflip-R-sSEED, cifar100n, cifar100n:<file>)")


def with_noisy_labels(splits: dict[str, DatasetSplit], spec: str, root: Path) -> dict[str, DatasetSplit]:
    """``splits`` with noisy train labels (the dataset renamed ``<name>@noisy=<spec>`` in every split, so features
    and runs never mix with the clean dataset's)."""
    if "train" not in splits:
        raise VlmtuneError(f"{next(iter(splits.values())).dataset} has no train split to put noisy labels on")
    train = splits["train"]
    if not train.labelled:
        raise VlmtuneError(f"{train.dataset}'s train images are unlabelled: there is nothing to make noisy")
    noisy = noisy_train_labels(train, spec, root)
    if noisy.min() < 0 or noisy.max() >= train.num_classes:
        raise VlmtuneError(f"the noisy labels of {spec!r} fall outside the {train.num_classes} classes")
    name = f"{train.dataset}{NOISY_SEP}{spec}"
    out = {k: replace(v, dataset=name) for k, v in splits.items()}
    out["train"] = replace(out["train"], labels=noisy)
    return out


def noise_rate(clean: DatasetSplit, noisy: DatasetSplit) -> float:
    """Share (%) of train labels that differ between the clean and the noisy dataset."""
    return round(100 * float(np.mean(clean.labels != noisy.labels)), 2)
