"""The method registry: ``register_method`` / ``get_method`` / ``list_methods``, and adapters by name.

Built-in methods are found by walking the regime packages (``frozen``, ``prompt``, ``blackbox``, ``labelfree``):
a new module dropped into one of them is registered with no other edit. Third-party methods register through the
``vlmtune.methods`` entry-point group (the entry point names a module or a ``Method`` class; loading it runs its
``@register_method``). The registry name an adapter was made by is recorded in its ``adapter.json``, never written
onto a classifier class, so one classifier class serves every method that returns it.
"""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
import re
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch

from vlmtune._io import file_sha256
from vlmtune.capabilities import Capability
from vlmtune.errors import UnknownName, VlmtuneError
from vlmtune.methods.api import ADAPTER_FORMAT, Classifier, Method, adapter_meta_sha256
from vlmtune.methods.options import build_config

REGIMES = ("frozen", "prompt", "blackbox", "labelfree")  # the regime packages under vlmtune.methods
ENTRY_POINT_GROUP = "vlmtune.methods"

_METHODS: dict[str, type[Method]] = {}
_loaded = False

# Adapters saved before format 1 name per-method classifier subclasses that no longer exist; all but these fall
# back to their method's own classifier class.
_V0_CLASSIFIERS = {"IFPLVisualClassifier": "TowerClassifier", "GRIPVisualClassifier": "TowerClassifier"}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method available by ``name`` (CLI, runner, contract tests)."""

    def deco(cls: type[Method]) -> type[Method]:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"method name {name!r}: lower-case letters, digits and underscores only")
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def _ensure_loaded() -> None:
    """Import every module of the regime packages, then the entry points (once per process)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for regime in REGIMES:
        package = importlib.import_module(f"vlmtune.methods.{regime}")
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            importlib.import_module(info.name)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:  # a broken plugin must not take the built-in methods down with it
            raise VlmtuneError(f"method plugin {entry.name!r} ({entry.value}) failed to load: {exc}") from exc


def get_method(name: str) -> type[Method]:
    """The registered method class called ``name`` (``UnknownName`` with a did-you-mean otherwise)."""
    _ensure_loaded()
    if name not in _METHODS:
        raise UnknownName("method", name, list(_METHODS))
    return _METHODS[name]


def regime_of(method: type[Method] | str) -> str:
    """The regime package a method (class or registered name) lives in (``"plugin"``: registered from elsewhere)."""
    if isinstance(method, str):
        method = get_method(method)
    parts = method.__module__.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["vlmtune", "methods"] and parts[2] in REGIMES else "plugin"


def list_methods(regime: str | None = None, pattern: str | None = None) -> list[type[Method]]:
    """Registered methods by name; ``regime`` keeps one regime package (or ``capability`` value: ``black_box``),
    ``pattern`` a shell-style name pattern (``"co*"``)."""
    import fnmatch

    _ensure_loaded()
    out = [_METHODS[k] for k in sorted(_METHODS)]
    if regime is not None:
        capabilities = {c.value for c in Capability}
        if regime not in (*REGIMES, "plugin", *capabilities):
            raise UnknownName("regime", regime, [*REGIMES, "plugin", *capabilities])
        out = [m for m in out if regime in (regime_of(m), m.capability.value)]
    if pattern is not None:
        out = [m for m in out if fnmatch.fnmatchcase(m.name, pattern)]
    return out


def method_of(classifier: type[Classifier]) -> str:
    """The one method whose adapters are of class ``classifier``, or the class name where several share it."""
    _ensure_loaded()
    names = [n for n, m in _METHODS.items() if classifier in (m.classifier, *m.extra_classifiers)]
    return names[0] if len(names) == 1 else classifier.__name__


def make_config(method: type[Method], overrides: dict[str, Any] | None = None) -> Any:
    """The method's config with ``overrides`` (CLI strings converted to the field's type, ranges checked;
    ``preset=NAME`` applies one of ``method.presets`` first)."""
    return build_config(method.config_cls, method.name, overrides, method.presets)


def _classifier_class(method: type[Method], name: str, version: int) -> type[Classifier]:
    kinds = {c.__name__: c for c in (method.classifier, *method.extra_classifiers)}
    if version == 0:
        name = _V0_CLASSIFIERS.get(name, name)
    return kinds.get(name, method.classifier)


def _numbers(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a JSON value, with its path (``settings.alpha``)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield path, float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")


def check_adapter(folder: Path, meta: dict[str, Any], data: Path, version: int) -> None:
    """Refuse an adapter whose files changed since ``Classifier.save`` wrote them (format 2 records the SHA-256 of
    its tensors and of its JSON) or whose numbers cannot be right: not finite, or a logit ``scale`` <= 0."""
    if not data.is_file():
        raise VlmtuneError(f"{folder} has adapter.json but no adapter.safetensors (the save did not finish)")
    if version >= 2:
        if meta.get("meta_sha256") != adapter_meta_sha256(meta):
            raise VlmtuneError(f"{folder / 'adapter.json'} was changed after it was saved (its checksum differs)")
        if meta.get("tensors_sha256") != file_sha256(data):
            raise VlmtuneError(f"{data} is damaged (its checksum differs from the one in adapter.json)")
    for where, x in _numbers(meta):
        if not math.isfinite(x):
            raise VlmtuneError(f"{folder / 'adapter.json'}: {where} is {x}, not a finite number")
        if where.rsplit(".", 1)[-1] == "scale" and x <= 0:
            raise VlmtuneError(f"{folder / 'adapter.json'}: {where} is {x}; a logit scale must be positive")


def load_classifier(folder: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """Load an adapter saved by ``Classifier.save`` (safetensors + JSON; never pickle); reads every format up to
    ``ADAPTER_FORMAT`` (format 0: adapters written before it was recorded)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / "adapter.json").read_text())
    version = meta.get("format", 0) if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("method"), str) or not isinstance(version, int):
        raise VlmtuneError(f"{folder / 'adapter.json'} is not a vlmtune adapter (no method recorded)")
    if version > ADAPTER_FORMAT:
        raise VlmtuneError(
            f"{folder} was saved in adapter format {version} (vlmtune {meta.get('vlmtune', '?')}); this vlmtune "
            f"reads formats 0-{ADAPTER_FORMAT}: upgrade vlmtune"
        )
    data = folder / "adapter.safetensors"
    check_adapter(folder, meta, data, version)
    method = get_method(meta["method"])
    cls = _classifier_class(method, meta.get("classifier", ""), version)
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(data)).items()}
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise VlmtuneError(f"{data} is damaged: tensor {bad!r} holds values that are not finite")
    clf = cls.from_state(tensors, meta)
    clf.method = method.name
    return clf, meta
