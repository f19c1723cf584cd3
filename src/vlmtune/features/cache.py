"""On-disk feature cache: safetensors + a JSON sidecar per entry, written atomically.

An entry is keyed by everything that determines its content: backbone spec and weights fingerprint,
preprocessing, dataset, split, the exact sample ids, the feature kind and dtype. A hit is only served when
the sidecar's key fields match, so a changed model or sample set never reads stale features.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlmtune._io import atomic_write


@dataclass(frozen=True)
class FeatureKey:
    backbone: str
    fingerprint: str
    preprocess: str
    dataset: str
    split: str
    samples: str  # hash of the sample ids
    kind: str  # "pooled" or "pooled+patches"
    dtype: str = "float32"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    """``$VLMTUNE_CACHE`` or ``~/.cache/vlmtune``."""
    return Path(os.environ.get("VLMTUNE_CACHE", Path.home() / ".cache" / "vlmtune")).expanduser()


class FeatureCache:
    """A folder of cached feature tensors (``None`` root = caching disabled)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() / "features" if root is not None else None
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)

    def _paths(self, key: FeatureKey) -> tuple[Path, Path]:
        assert self.root is not None
        d = key.digest()
        return self.root / f"{d}.safetensors", self.root / f"{d}.json"

    def get(self, key: FeatureKey) -> dict[str, torch.Tensor] | None:
        if self.root is None:
            return None
        data, meta = self._paths(key)
        if not (data.is_file() and meta.is_file()):
            return None
        try:
            if json.loads(meta.read_text()).get("key") != asdict(key):
                return None
            return load_file(str(data))
        except Exception:  # safetensors raises its own error type on damaged files
            return None  # a damaged entry is a miss; it is rewritten

    def put(self, key: FeatureKey, tensors: dict[str, torch.Tensor]) -> None:
        if self.root is None:
            return
        data, meta = self._paths(key)
        atomic_write(data, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
        sidecar = {"key": asdict(key), "shapes": {k: list(v.shape) for k, v in tensors.items()}}
        atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=1)))
