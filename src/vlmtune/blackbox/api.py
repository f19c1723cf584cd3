"""The black-box boundary: what a black-box method may see of a VLM.

A ``BlackBoxVLM`` takes images once (``upload`` -> ids), then answers ``predict`` requests — class names, a
template, and optionally a batch of continuous prompt contexts (C, n_ctx, d_tok) — with scores (C, N, K).
Nothing else crosses: no weights, no gradients, no features. Each candidate context scored on a set of images
is one query, charged against a hard ``QueryBudget`` before any model work is done.

This module imports no model code (checked by an import-linter contract).
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from PIL import Image

ContextMode = Literal["add", "replace"]


def image_bytes(image: Image.Image) -> bytes:
    """PNG bytes of a PIL image (what a client uploads)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


class BudgetExceeded(RuntimeError):
    """A request would take the query count past the budget; nothing was computed or charged."""

    def __init__(self, requested: int, used: int, limit: int) -> None:
        self.requested, self.used, self.limit = requested, used, limit
        super().__init__(f"query budget exceeded: {requested} requested, {used} of {limit} used")


class QueryBudget:
    """A hard, thread-safe query limit: ``charge(n)`` either takes all n queries or raises and takes none."""

    def __init__(self, limit: int | None = None, used: int = 0) -> None:
        if limit is not None and limit < 0:
            raise ValueError("budget limit must be >= 0")
        self.limit, self._used = limit, used
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else self.limit - self._used

    def charge(self, n: int) -> None:
        if n < 0:
            raise ValueError("cannot charge a negative number of queries")
        with self._lock:
            if self.limit is not None and self._used + n > self.limit:
                raise BudgetExceeded(n, self._used, self.limit)
            self._used += n


@dataclass(frozen=True)
class ModelInfo:
    """What the service tells about itself: enough to shape a prompt context, nothing about weights.

    Attributes:
        name: the served model's public name.
        token_width: d_tok, the width of one context vector.
        max_context: the most context vectors a request may carry.
        score: ``"logits"`` (scaled cosine similarities) or ``"probs"``.
        visual_width: width of one visual prompt token, or None if the service takes none (not a ViT).
        max_visual: the most visual prompt tokens a request may carry.
    """

    name: str
    token_width: int
    max_context: int
    score: str = "logits"
    visual_width: int | None = None
    max_visual: int = 0


@dataclass(frozen=True)
class PredictRequest:
    """Score images against class prompts.

    Attributes:
        image_ids: ids returned by ``upload``.
        classnames: the K class names.
        template: prompt template with ``{}`` for the class name, e.g. ``"a photo of a {}."``.
        contexts: optional (C, n_ctx, d_tok) float32 batch of prompt contexts; each is one candidate.
        mode: ``"add"``: context vectors are added to the embeddings of the template's first n_ctx words
            (BBT / CraFT: p = p0 + A z); ``"replace"``: they replace those words' embeddings.
        visual_contexts: optional (C, n_v, d_vis) float32 visual prompt tokens, appended to every image's token
            sequence (ViT services only; ``ModelInfo.visual_width``). With ``contexts`` too, candidate c pairs
            ``contexts[c]`` with ``visual_contexts[c]``.
    """

    image_ids: list[str]
    classnames: list[str]
    template: str = "a photo of a {}."
    contexts: np.ndarray | None = None
    mode: ContextMode = "add"
    visual_contexts: np.ndarray | None = None

    @property
    def n_candidates(self) -> int:
        for a in (self.contexts, self.visual_contexts):
            if a is not None:
                return int(a.shape[0])
        return 1

    def validate(self, info: ModelInfo) -> None:
        """Raise ``ValueError`` on anything malformed (the service answers 4xx)."""
        if not self.image_ids:
            raise ValueError("image_ids is empty")
        if not self.classnames or any(not isinstance(c, str) or not c.strip() for c in self.classnames):
            raise ValueError("classnames must be non-empty strings")
        if self.template.count("{}") != 1:
            raise ValueError("template must contain exactly one '{}'")
        if self.mode not in ("add", "replace"):
            raise ValueError(f"mode must be 'add' or 'replace', not {self.mode!r}")
        if self.contexts is not None:
            _check_tokens("contexts", self.contexts, info.max_context, info.token_width)
        if self.visual_contexts is not None:
            if info.visual_width is None:
                raise ValueError(f"{info.name} takes no visual prompts (its image tower is not a ViT)")
            _check_tokens("visual_contexts", self.visual_contexts, info.max_visual, info.visual_width)
            if self.contexts is not None and self.contexts.shape[0] != self.visual_contexts.shape[0]:
                raise ValueError("contexts and visual_contexts must hold the same number of candidates")


def _check_tokens(name: str, a: np.ndarray, max_tokens: int, width: int) -> None:
    """A (C >= 1, 1..max_tokens, width) array of finite floats, else ``ValueError``."""
    if a.ndim != 3 or a.shape[0] < 1 or not 1 <= a.shape[1] <= max_tokens or a.shape[2] != width:
        raise ValueError(f"{name} must have shape (C>=1, 1..{max_tokens}, {width}), got {tuple(a.shape)}")
    if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite floats")


@dataclass(frozen=True)
class ImageRefs:
    """Uploaded images and their labels: what a black-box method trains on (ids only, never pixels or features)."""

    ids: list[str]
    labels: Any  # (N,) int64 tensor

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Usage:
    used: int
    limit: int | None
    images: int = 0
    detail: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class BlackBoxVLM(Protocol):
    """A vision-language model behind an API that returns only predictions."""

    def info(self) -> ModelInfo: ...

    def upload(self, images: list[bytes]) -> list[str]:
        """Encoded image files (PNG/JPEG bytes) -> ids for later requests (uploads are not queries)."""
        ...

    def predict(self, request: PredictRequest) -> np.ndarray:
        """Scores (C, N, K) float32 for C candidates, N images, K classes; charges C queries."""
        ...

    def usage(self) -> Usage: ...
