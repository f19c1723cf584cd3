"""On-disk feature cache: safetensors + a JSON sidecar per entry, written atomically.

An entry is keyed by everything that determines its content: backbone spec and weights fingerprint,
preprocessing, dataset, split, the exact sample ids, the feature kind and dtype. A hit is only served when
the sidecar's key fields match, the tensor file matches the SHA-256 recorded at write time, and the tensors have
the expected shapes, sample count and finite values; anything else is a logged miss, and the entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlmtune._io import atomic_write, file_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureKey:
    backbone: str
    fingerprint: str
    preprocess: str
    dataset: str
    split: str
    samples: str  # hash of the sample ids
    kind: str  # "pooled" or "pooled+patches16" (patches in float16)
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

    def get(self, key: FeatureKey, count: int | None = None, dim: int | None = None) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, if present and intact (``count`` samples of width ``dim`` where given)."""
        if self.root is None:
            return None
        data, meta = self._paths(key)
        if not (data.is_file() and meta.is_file()):
            return None
        try:
            sidecar = json.loads(meta.read_text())
            if sidecar.get("key") != asdict(key):
                return None  # another key with the same digest prefix: a plain miss
            problem = self._check(data, sidecar, count, dim)
            if problem is None:
                tensors = load_file(str(data))
                problem = self._check_tensors(tensors, sidecar)
                if problem is None:
                    return tensors
        except Exception as exc:  # safetensors raises its own error type on damaged files
            problem = f"unreadable ({type(exc).__name__})"
        log.warning("feature cache entry %s is damaged (%s): recomputing it", data.name, problem)
        return None

    @staticmethod
    def _check(data: Path, sidecar: dict, count: int | None, dim: int | None) -> str | None:
        shapes = sidecar.get("shapes", {})
        feats = shapes.get("features")
        if not feats or len(feats) != 2:
            return "no feature shape recorded"
        if count is not None and feats[0] != count:
            return f"{feats[0]} samples recorded, {count} expected"
        if dim is not None and feats[1] != dim:
            return f"width {feats[1]} recorded, {dim} expected"
        if file_sha256(data) != sidecar.get("sha256"):
            return "content does not match its checksum"
        return None

    @staticmethod
    def _check_tensors(tensors: dict[str, torch.Tensor], sidecar: dict) -> str | None:
        shapes = sidecar.get("shapes", {})
        if {k: list(v.shape) for k, v in tensors.items()} != shapes:
            return "tensor shapes differ from the record"
        if not all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point()):
            return "non-finite values"
        return None

    def put(self, key: FeatureKey, tensors: dict[str, torch.Tensor]) -> None:
        if self.root is None:
            return
        data, meta = self._paths(key)
        atomic_write(data, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
        sidecar = {
            "key": asdict(key),
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "sha256": file_sha256(data),
        }
        atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=1)))
