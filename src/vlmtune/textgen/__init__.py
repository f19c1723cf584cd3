"""Text generation for label-free methods: LMM image / group descriptions, LLM class descriptions and templates.

Backends (``toy``, ``openai``, ``transformers``) implement ``TextGenerator``; ``TextStage`` caches every text with
its provenance (``TextCache``) and loads a backend only on a miss; ``DatasetTexts`` binds a stage to a dataset.
Methods never import a backend: the runner hands them a ``DatasetTexts`` as ``Task.texts``.
"""

from vlmtune.textgen.backends import BACKENDS, load_generator
from vlmtune.textgen.base import GenRequest, GenSettings, TextGenerator
from vlmtune.textgen.cache import TextCache, text_key
from vlmtune.textgen.collage import collage
from vlmtune.textgen.prompts import KINDS, Prompts
from vlmtune.textgen.stage import DatasetTexts, TextStage, group_members

__all__ = [
    "BACKENDS",
    "KINDS",
    "DatasetTexts",
    "GenRequest",
    "GenSettings",
    "Prompts",
    "TextCache",
    "TextGenerator",
    "TextStage",
    "collage",
    "group_members",
    "load_generator",
    "text_key",
]
