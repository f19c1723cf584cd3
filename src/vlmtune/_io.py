"""Small file helpers shared across the package."""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

_UMASK_LOCK = threading.Lock()


@functools.cache
def _umask() -> int:
    """The process umask, read once (from /proc where it exists: ``os.umask`` can only read it by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], object], mode: int | None = None) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it over ``path`` (all or nothing).

    The file gets ``mode`` if given (e.g. 0o600 for secrets), else the usual ``0o666 & ~umask`` that ``open``
    would give (mkstemp's 0600 would make shared caches unreadable to the rest of a group).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if mode is not None:
            os.chmod(tmp, mode)  # before anything secret is written
        write(tmp)
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())  # writers may have replaced the file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()
