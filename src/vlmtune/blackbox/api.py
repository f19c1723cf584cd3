"""The black-box boundary: what a black-box method may see of a VLM.

A ``BlackBoxVLM`` takes images once (``upload`` -> ids), then answers ``predict`` requests — class names, a
template, and optionally a batch of continuous prompt contexts (C, n_ctx, d_tok), visual prompt tokens or
per-image pixel prompts (C, N, 3, S, S) — with scores (C, N, K).
Nothing else crosses: no weights, no gradients, no features. Each candidate context scored on a set of images
is one query, charged against a hard ``QueryBudget`` before any model work is done.

This module imports no model code (checked by an import-linter contract).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from vlmtune.data.templates import check_template

ContextMode = Literal["add", "replace"]


def image_bytes(image: Image.Image) -> bytes:
    """PNG bytes of a PIL image (what a client uploads)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


UPLOAD_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})  # the formats a service decodes (ServiceLimits)


def upload_bytes(path: str | Path | None, image: Callable[[], Image.Image]) -> bytes:
    """What to upload for one image: its file's own bytes where the service accepts the format (no re-encoding of
    a 200 KB JPEG into a 1 MB PNG), else ``image()`` as PNG."""
    if path is not None and Path(path).suffix.lower() in UPLOAD_SUFFIXES:
        return Path(path).read_bytes()
    return image_bytes(image())


class BudgetExceeded(RuntimeError):
    """A request would take a key past its hard limit; nothing was computed or charged."""

    def __init__(self, requested: int, used: int, limit: int, what: str = "query") -> None:
        self.requested, self.used, self.limit, self.what = requested, used, limit, what
        super().__init__(f"{what} budget exceeded: {requested} requested, {used} of {limit} used")


class UnknownImages(LookupError):
    """A request names image ids that were never uploaded (with this key); the service answers 404."""

    @classmethod
    def count(cls, missing: int, total: int) -> UnknownImages:
        return cls(f"{missing} of {total} image ids were never uploaded (with this key)")

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0]) if self.args else "unknown image ids"


class QueryBudget:
    """A hard, thread-safe query limit, and optionally a work limit (scores computed, candidates x images x
    classes): ``charge(n, work)`` either takes all of both or raises ``BudgetExceeded`` and takes nothing;
    ``refund`` gives back a charge whose answer could not be delivered."""

    def __init__(
        self, limit: int | None = None, used: int = 0, work_limit: int | None = None, work_used: int = 0
    ) -> None:
        if (limit is not None and limit < 0) or (work_limit is not None and work_limit < 0):
            raise ValueError("budget limits must be >= 0")
        self.limit, self._used = limit, used
        self.work_limit, self._work = work_limit, work_used
        self._uploads = 0
        self._lock = threading.Lock()

    @property
    def uploads(self) -> int:
        """Images encoded for this account in all (new content only)."""
        return self._uploads

    def record_uploads(self, n: int) -> None:
        with self._lock:
            self._uploads += n

    @property
    def used(self) -> int:
        return self._used

    @property
    def work_used(self) -> int:
        return self._work

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else self.limit - self._used

    def charge(self, n: int, work: int = 0) -> None:
        if n < 0 or work < 0:
            raise ValueError("cannot charge a negative amount")
        with self._lock:
            if self.limit is not None and self._used + n > self.limit:
                raise BudgetExceeded(n, self._used, self.limit)
            if self.work_limit is not None and self._work + work > self.work_limit:
                raise BudgetExceeded(work, self._work, self.work_limit, "work")
            self._used += n
            self._work += work

    def refund(self, n: int, work: int = 0) -> None:
        with self._lock:
            self._used, self._work = max(0, self._used - n), max(0, self._work - work)


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may ask of a black box: every limit is checked before anything is charged or computed.

    Attributes:
        max_images: image ids per request (repeats count).
        max_classes: class names per request.
        max_candidates: candidate contexts per request.
        max_prompts: candidates x classes, the prompts through the text tower per request.
        max_reply_values: candidates x images x classes, the scores of one reply (float32: 4 bytes each).
        max_image_forwards: candidates x images re-encoded for visual or pixel prompts per request.
        max_pixel_values: the values of a request's pixel prompts (candidates x images x 3 x S x S; float32).
        max_classname_chars: characters of one class name.
        max_template_chars: characters of the template.
        max_context_abs: largest |value| of a context or visual token (larger values overflow the towers).
        max_upload_images: images per upload request.
        max_image_bytes: bytes of one uploaded file.
        max_pixels: width x height of one uploaded image, read from its header before decoding.
        max_upload_pixels: width x height summed over the new images of one upload request (headers read first).
        pixels_per_work: decoded pixels charged as one unit of work (a key's work limit counts uploads too).
        image_formats: accepted upload formats (Pillow names); nothing else is decoded.
    """

    max_images: int = 20_000
    max_classes: int = 2_000
    max_candidates: int = 64
    max_prompts: int = 131_072
    max_reply_values: int = 2**26
    max_image_forwards: int = 65_536
    max_pixel_values: int = 2**25
    max_classname_chars: int = 200
    max_template_chars: int = 300
    max_context_abs: float = 1e4
    max_upload_images: int = 1024
    max_image_bytes: int = 16 * 2**20
    max_pixels: int = 4096 * 4096
    max_upload_pixels: int = 2**27
    pixels_per_work: int = 4096
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def decode_work(self, pixels: int) -> int:
        """The work charged for decoding ``pixels`` uploaded pixels (a 224 x 224 image: 13 units)."""
        return -(-pixels // self.pixels_per_work)

    def images_per_request(self, classes: int, values_per_image: int = 0, reencoded: bool = False) -> int:
        """The most images one candidate may be scored on in one request with ``classes`` class names; images
        ``reencoded`` under visual or pixel prompts, with ``values_per_image`` pixel-prompt values each
        (3 x S x S; implies re-encoding). 0: not even one."""
        limits = [self.max_images, self.max_reply_values // classes]
        if reencoded or values_per_image:
            limits.append(self.max_image_forwards)
        if values_per_image:
            limits.append(self.max_pixel_values // values_per_image)
        return min(limits)

    def candidates_per_request(
        self, images: int, classes: int, values_per_image: int = 0, reencoded: bool = False
    ) -> int:
        """The most candidates one request may score on ``images`` images (0: not even one)."""
        limits = [self.max_candidates, self.max_prompts // classes, self.max_reply_values // (images * classes)]
        if reencoded or values_per_image:
            limits.append(self.max_image_forwards // images)
        if values_per_image:
            limits.append(self.max_pixel_values // (images * values_per_image))
        return min(limits)


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
        limits: the ``ServiceLimits`` of every request, as a dict (clients split their requests to fit).
        max_body_bytes: the largest request body the service accepts (None in process).
        image_size: S, the side of the model's square input, if the service takes pixel prompts (else None).
    """

    name: str
    token_width: int
    max_context: int
    score: str = "logits"
    visual_width: int | None = None
    max_visual: int = 0
    limits: dict[str, Any] = field(default_factory=lambda: ServiceLimits().to_json())
    max_body_bytes: int | None = None
    image_size: int | None = None

    @property
    def service_limits(self) -> ServiceLimits:
        known = {k: v for k, v in self.limits.items() if k in ServiceLimits.__dataclass_fields__}
        known["image_formats"] = tuple(known.get("image_formats", ServiceLimits.image_formats))
        return ServiceLimits(**known)


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
        pixel_prompts: optional (C, N, 3, S, S) float32 per-image pixel prompts in [0, 1] pixel units (services
            with ``ModelInfo.image_size`` S): candidate c scores image n as clamp(x_n + pixel_prompts[c, n], 0, 1),
            x_n the image as the model sees it (resized and cropped, before normalisation). BlackVIP's queries.
            With ``contexts`` too, candidate c pairs ``contexts[c]`` with ``pixel_prompts[c]``.
    """

    image_ids: list[str]
    classnames: list[str]
    template: str = "a photo of a {}."
    contexts: np.ndarray | None = None
    mode: ContextMode = "add"
    visual_contexts: np.ndarray | None = None
    pixel_prompts: np.ndarray | None = None

    @property
    def n_candidates(self) -> int:
        for a in (self.contexts, self.visual_contexts, self.pixel_prompts):
            if a is not None:
                return int(a.shape[0])
        return 1

    @property
    def n_values(self) -> int:
        """Scores in the reply: candidates x images x classes (the work a request asks for)."""
        return self.n_candidates * len(self.image_ids) * len(self.classnames)

    def validate(self, info: ModelInfo) -> None:
        """Raise ``ValueError`` on anything malformed or over the service's limits (the service answers 4xx)."""
        lim = info.service_limits
        n, k, c = len(self.image_ids), len(self.classnames), self.n_candidates
        if not self.image_ids:
            raise ValueError("image_ids is empty")
        if n > lim.max_images:
            raise ValueError(f"{n} image ids in one request; the limit is {lim.max_images}")
        if not all(isinstance(i, str) and 0 < len(i) <= 64 for i in self.image_ids):
            raise ValueError("image ids must be the strings upload returned")
        if not self.classnames or k > lim.max_classes:
            raise ValueError(f"a request needs 1 to {lim.max_classes} class names, got {k}")
        for i, name in enumerate(self.classnames):
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"classnames[{i}] must be a non-empty string")
            if len(name) > lim.max_classname_chars:
                raise ValueError(f"classnames[{i}] has {len(name)} characters; the limit is {lim.max_classname_chars}")
        if not isinstance(self.template, str) or len(self.template) > lim.max_template_chars:
            raise ValueError(f"template must be a string of at most {lim.max_template_chars} characters")
        check_template(self.template)
        if self.mode not in ("add", "replace"):
            raise ValueError(f"mode must be 'add' or 'replace', not {self.mode!r}")
        if self.contexts is not None:
            _check_tokens("contexts", self.contexts, info.max_context, info.token_width, lim)
        if self.visual_contexts is not None:
            if info.visual_width is None:
                raise ValueError(f"{info.name} takes no visual prompts (its image tower is not a ViT)")
            _check_tokens("visual_contexts", self.visual_contexts, info.max_visual, info.visual_width, lim)
            if self.contexts is not None and self.contexts.shape[0] != self.visual_contexts.shape[0]:
                raise ValueError("contexts and visual_contexts must hold the same number of candidates")
            if c * n > lim.max_image_forwards:
                raise ValueError(f"{c} candidates x {n} images re-encoded; the limit is {lim.max_image_forwards}")
        if self.pixel_prompts is not None:
            self._check_pixels(info, lim)
        if c > lim.max_candidates:
            raise ValueError(f"{c} candidates in one request; the limit is {lim.max_candidates}")
        if c * k > lim.max_prompts:
            raise ValueError(f"{c} candidates x {k} classes = {c * k} prompts; the limit is {lim.max_prompts}")
        if self.n_values > lim.max_reply_values:
            raise ValueError(
                f"the reply would hold {c} x {n} x {k} = {self.n_values} scores; the limit is "
                f"{lim.max_reply_values}: split the request"
            )

    def _check_pixels(self, info: ModelInfo, lim: ServiceLimits) -> None:
        a, s, n = self.pixel_prompts, info.image_size, len(self.image_ids)
        assert a is not None
        if s is None:
            raise ValueError(f"{info.name} takes no pixel prompts")
        if self.visual_contexts is not None:
            raise ValueError("a request carries visual_contexts or pixel_prompts, not both")
        if a.ndim != 5 or a.shape[0] < 1 or tuple(a.shape[1:]) != (n, 3, s, s):
            raise ValueError(f"pixel_prompts must have shape (C>=1, {n}, 3, {s}, {s}), got {tuple(a.shape)}")
        if a.size > lim.max_pixel_values:
            raise ValueError(f"{a.size} pixel prompt values in one request; the limit is {lim.max_pixel_values}")
        c = a.shape[0]
        if self.contexts is not None and self.contexts.shape[0] != c:
            raise ValueError("contexts and pixel_prompts must hold the same number of candidates")
        if c * n > lim.max_image_forwards:
            raise ValueError(f"{c} candidates x {n} images re-encoded; the limit is {lim.max_image_forwards}")
        if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
            raise ValueError("pixel_prompts must be finite floats")
        if float(np.abs(a).max()) > lim.max_context_abs:
            raise ValueError(f"pixel_prompts values must lie within +-{lim.max_context_abs:g}")


def _check_tokens(name: str, a: np.ndarray, max_tokens: int, width: int, limits: ServiceLimits) -> None:
    """A (C >= 1, 1..max_tokens, width) array of finite floats within the value bound, else ``ValueError``."""
    if a.ndim != 3 or a.shape[0] < 1 or not 1 <= a.shape[1] <= max_tokens or a.shape[2] != width:
        raise ValueError(f"{name} must have shape (C>=1, 1..{max_tokens}, {width}), got {tuple(a.shape)}")
    if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite floats")
    if float(np.abs(a).max()) > limits.max_context_abs:
        raise ValueError(f"{name} values must lie within +-{limits.max_context_abs:g}")


@dataclass(frozen=True)
class ImageRefs:
    """Uploaded images and their labels: what a black-box method trains on (ids; never the model's features).

    ``images``: the client's own copies of the same images (``images[i]`` a PIL image), for methods that compute
    input-dependent prompts on the client (BlackVIP's coordinator); None when the client kept none.
    """

    ids: list[str]
    labels: Any  # (N,) int64 tensor
    images: Any = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Usage:
    """A key's account: queries used and allowed, work (scores computed) used and allowed, images held now and
    their quota, images uploaded in all."""

    used: int
    limit: int | None
    images: int = 0
    work: int = 0
    work_limit: int | None = None
    image_quota: int | None = None
    uploaded: int = 0

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else self.limit - self.used


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
