"""The text-generation protocol: requests, settings, and what a backend implements.

A backend turns ``GenRequest`` s (a prompt, optionally with one image) into texts under ``GenSettings``. Methods
never see a backend: they ask the runner's ``TextStage`` (``vlmtune.textgen.stage``), which caches every text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from PIL import Image
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid", strict=True))
class GenSettings:
    """Generation settings; part of every cache key.

    Defaults are the papers': greedy decoding (LatteCLIP: temperature 0) and at most 77 new tokens. ``seed`` tells
    sampled generations apart (template i of n is generated with seed i) and seeds backends that accept one.
    """

    max_new_tokens: int = Field(default=77, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GenRequest:
    """One generation: a user prompt and at most one image (a collage stands for a group, as in LatteCLIP)."""

    prompt: str
    image: Image.Image | None = None


@runtime_checkable
class TextGenerator(Protocol):
    """What a backend implements. ``name`` and ``model`` enter the cache key, ``revision`` the provenance."""

    name: str
    model: str
    revision: str

    def generate(self, requests: Sequence[GenRequest], settings: GenSettings) -> list[str]:
        """One text per request, in order (the backend batches or parallelises as it can)."""
        ...


@runtime_checkable
class LikelihoodScorer(Protocol):
    """What a backend that can score given answers adds (the toy describer, transformers models): LMM zero-shot
    ranks the class names by it when the backend cannot follow an instruction (``follows_instructions``)."""

    follows_instructions: bool

    def score(self, requests: Sequence[GenRequest], continuations: Sequence[str]) -> list[list[float]]:
        """Log-likelihood of each continuation as the answer to each request -> (len(requests), len(continuations))."""
        ...


def clean_text(text: str) -> str:
    """A generation as LatteCLIP stores it: stripped, newlines replaced by spaces."""
    return " ".join(text.replace("\n", " ").split())
