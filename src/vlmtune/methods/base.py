"""Deprecated: the method contract moved to ``vlmtune.methods.api`` and registration to
``vlmtune.methods.registry``. This alias keeps third-party plugins importing for one release (0.2) and warns."""

from __future__ import annotations

import warnings

from vlmtune.methods.api import Classifier, Method, Task, TrainingHooks
from vlmtune.methods.registry import get_method, list_methods, load_classifier, make_config, register_method

warnings.warn(
    "vlmtune.methods.base is deprecated: import from vlmtune.methods.api and vlmtune.methods.registry "
    "(or the public API, vlmtune)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "Classifier",
    "Method",
    "Task",
    "TrainingHooks",
    "get_method",
    "list_methods",
    "load_classifier",
    "make_config",
    "register_method",
]
