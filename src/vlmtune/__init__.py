"""vlmtune: adapt CLIP-style vision-language models to an image-classification task.

Public API (the names below are the compatibility promise; submodules may move between releases)::

    from vlmtune import load_backbone, load_dataset, few_shot, RunConfig, run, get_method, list_methods

Names load on first use (PEP 562), so ``import vlmtune`` and ``vlmtune --help`` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vlmtune._version import __version__

_EXPORTS = {
    "load_backbone": "vlmtune.backbones",
    "Backbone": "vlmtune.backbones.base",
    "Capability": "vlmtune.backbones.base",
    "DatasetSplit": "vlmtune.data",
    "base_new_split": "vlmtune.data",
    "few_shot": "vlmtune.data",
    "few_shot_indices": "vlmtune.data",
    "list_datasets": "vlmtune.data",
    "load_dataset": "vlmtune.data",
    "CorruptImage": "vlmtune.errors",
    "DatasetNotFound": "vlmtune.errors",
    "UnknownName": "vlmtune.errors",
    "VlmtuneError": "vlmtune.errors",
    "WeightsNotAvailable": "vlmtune.errors",
    "FeatureCache": "vlmtune.features",
    "FeatureSet": "vlmtune.features",
    "extract_features": "vlmtune.features",
    "Classifier": "vlmtune.methods.api",
    "Method": "vlmtune.methods.api",
    "Task": "vlmtune.methods.api",
    "get_method": "vlmtune.methods.registry",
    "list_methods": "vlmtune.methods.registry",
    "load_classifier": "vlmtune.methods.registry",
    "register_method": "vlmtune.methods.registry",
    "RunConfig": "vlmtune.runs.runner",
    "RunResult": "vlmtune.runs.runner",
    "run": "vlmtune.runs.runner",
    "ExecSettings": "vlmtune.settings",
}

__all__ = [
    "Backbone",
    "Capability",
    "Classifier",
    "CorruptImage",
    "DatasetNotFound",
    "DatasetSplit",
    "ExecSettings",
    "FeatureCache",
    "FeatureSet",
    "Method",
    "RunConfig",
    "RunResult",
    "Task",
    "UnknownName",
    "VlmtuneError",
    "WeightsNotAvailable",
    "__version__",
    "base_new_split",
    "extract_features",
    "few_shot",
    "few_shot_indices",
    "get_method",
    "list_datasets",
    "list_methods",
    "load_backbone",
    "load_classifier",
    "load_dataset",
    "register_method",
    "run",
]

if TYPE_CHECKING:
    from vlmtune.backbones import load_backbone
    from vlmtune.backbones.base import Backbone, Capability
    from vlmtune.data import DatasetSplit, base_new_split, few_shot, few_shot_indices, list_datasets, load_dataset
    from vlmtune.errors import CorruptImage, DatasetNotFound, UnknownName, VlmtuneError, WeightsNotAvailable
    from vlmtune.features import FeatureCache, FeatureSet, extract_features
    from vlmtune.methods.api import Classifier, Method, Task
    from vlmtune.methods.registry import get_method, list_methods, load_classifier, register_method
    from vlmtune.runs.runner import RunConfig, RunResult, run
    from vlmtune.settings import ExecSettings


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlmtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
