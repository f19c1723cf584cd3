"""Exceptions users can catch; each message says what was asked for and what to do."""

from __future__ import annotations


class VlmtuneError(Exception):
    """Base class of vlmtune's errors."""


class WeightsNotAvailable(VlmtuneError):
    """Pretrained weights are not in any local cache and cannot be downloaded (offline or no network)."""

    def __init__(self, spec: str, searched: list[str], reason: str = "") -> None:
        self.spec, self.searched = spec, searched
        where = "\n".join(f"  - {p}" for p in searched) or "  (nothing to search)"
        hint = f"\nreason: {reason}" if reason else ""
        super().__init__(
            f"weights for backbone {spec!r} are not available offline; looked in:\n{where}{hint}\n"
            "Download them once on a machine with internet (they land in the same cache), pass a local file "
            "('openclip:ARCH@/path/to/weights.safetensors'), or use the bundled 'toy' backbone."
        )


class DatasetNotFound(VlmtuneError):
    """A dataset's files are missing; the message says where they were expected and how to get them."""


class CorruptImage(VlmtuneError):
    """An image file could not be decoded."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(f"cannot read image {path}: {reason}")


class UnknownName(VlmtuneError, KeyError):
    """A method, dataset or backbone name that no registry knows."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])
