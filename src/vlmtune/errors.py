"""Exceptions users can catch; each message says what was asked for and what to do."""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType


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


def _normal(name: str) -> str:
    return name.lower().replace("-", "_").replace(" ", "_")


def did_you_mean(name: str, known: list[str]) -> list[str]:
    """Known names close to ``name`` (case, '-' vs '_' and small typos forgiven), best first."""
    by_normal = {_normal(k): k for k in known}
    exact = by_normal.get(_normal(name))
    if exact is not None:
        return [exact]
    return [by_normal[m] for m in difflib.get_close_matches(_normal(name), list(by_normal), n=3, cutoff=0.6)]


class UnknownName(VlmtuneError, KeyError):
    """A method, dataset, option or backbone name that no registry knows ("did you mean" included)."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        self.kind, self.name, self.known = kind, name, list(known)
        close = did_you_mean(name, self.known)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(sorted(self.known))
        if len(listing) > 300:
            listing = listing[:300].rsplit(", ", 1)[0] + ", ..."
        super().__init__(f"unknown {kind} {name!r}{hint} (known: {listing})")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class MissingExtra(VlmtuneError, ImportError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""

    def __init__(self, what: str, module: str, extra: str) -> None:
        self.module, self.extra = module, extra
        super().__init__(f'{what} needs the optional package {module!r}: pip install "vlmtune[{extra}]"')


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import an optional dependency, or raise ``MissingExtra`` saying which extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there but one of its own dependencies is missing: show the real error
        raise MissingExtra(what, module, extra) from None
