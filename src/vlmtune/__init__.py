"""vlmtune: adapt CLIP-style vision-language models to an image-classification task.

Public API::

    from vlmtune import load_backbone, load_dataset, few_shot, RunConfig, run, get_method, list_methods
"""

from vlmtune.backbones import load_backbone
from vlmtune.backbones.base import Backbone, Capability
from vlmtune.data import DatasetSplit, base_new_split, few_shot, few_shot_indices, list_datasets, load_dataset
from vlmtune.errors import CorruptImage, DatasetNotFound, UnknownName, VlmtuneError, WeightsNotAvailable
from vlmtune.features import FeatureCache, FeatureSet, extract_features
from vlmtune.methods.api import Classifier, Method, Task
from vlmtune.methods.registry import get_method, list_methods, load_classifier, register_method
from vlmtune.runs.runner import RunConfig, RunResult, run

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "Capability",
    "Classifier",
    "CorruptImage",
    "DatasetNotFound",
    "DatasetSplit",
    "FeatureCache",
    "FeatureSet",
    "Method",
    "RunConfig",
    "RunResult",
    "Task",
    "UnknownName",
    "VlmtuneError",
    "WeightsNotAvailable",
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
