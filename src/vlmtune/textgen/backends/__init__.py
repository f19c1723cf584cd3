"""Text-generation backends by name; each module imports its optional library only when it is used."""

from __future__ import annotations

from typing import Any

from vlmtune.errors import UnknownName, VlmtuneError
from vlmtune.textgen.base import TextGenerator

BACKENDS = ("toy", "openai", "transformers")
DEFAULT_MODEL = {"toy": "toy-describer"}


def model_name(backend: str, model: str | None) -> str:
    """The model id that enters cache keys (known without loading anything)."""
    if backend not in BACKENDS:
        raise UnknownName("text-generation backend", backend, list(BACKENDS))
    if model:
        return model
    if backend in DEFAULT_MODEL:
        return DEFAULT_MODEL[backend]
    raise VlmtuneError(f"the {backend} text-generation backend needs a model: --textgen-model NAME")


def load_generator(
    backend: str, model: str | None = None, endpoint: str | None = None, device: str = "cpu", **options: Any
) -> TextGenerator:
    """A backend instance: ``toy`` (bundled, offline), ``openai`` (an endpoint), ``transformers`` (local model)."""
    name = model_name(backend, model)
    if backend == "toy":
        from vlmtune.textgen.backends.toy import ToyBackend

        return ToyBackend(None if name == DEFAULT_MODEL["toy"] else name, device=device)
    if backend == "openai":
        from vlmtune.textgen.backends.openai_api import OpenAIBackend

        return OpenAIBackend(name, endpoint, **options)
    from vlmtune.textgen.backends.hf import TransformersBackend

    return TransformersBackend(name, device=device, **options)
