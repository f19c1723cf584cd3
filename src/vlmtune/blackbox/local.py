"""``LocalBlackBox``: the black-box service logic over any backbone, in process.

The server side of the boundary (it may use a backbone; black-box methods may not import this module's
dependencies). Images are encoded once at upload and kept by content hash, so a query costs only text-tower
work; candidates of a request are batched through the text tower together. A request is validated in full
(``PredictRequest.validate``: shapes, values, limits of work and reply size), then charged, then computed; a
request whose computation fails or gives non-finite scores is refunded. Outputs are detached numpy arrays.

Each box is one namespace: the HTTP service gives every API key its own box (``fork``), so a key sees, scores
and counts only its own uploads, and nothing about another key's (not even through upload timing).

With ``visual_prompts=True`` (ViT backbones) the preprocessed pixels are kept as well, and a request may carry
visual prompt tokens: then every image is encoded again under every candidate's tokens (C x N image forwards,
the cost CraFT's App. B reports for "+ vp"). With ``pixel_prompts=True`` (any image tower) a request may carry
per-image pixel prompts (BlackVIP): each is added to the image in [0, 1] pixel units, clamped, normalised and
encoded: C x N image forwards as well.
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from vlmtune.backbones.base import Backbone
from vlmtune.backbones.prefix import Precision, resolve_precision, shared_prefix_length
from vlmtune.blackbox.api import (
    BudgetExceeded,
    ModelInfo,
    PredictRequest,
    QueryBudget,
    ServiceLimits,
    UnknownImages,
    Usage,
    image_bytes,
)
from vlmtune.blackbox.turns import FairTurns


def open_upload(data: bytes, limits: ServiceLimits) -> Image.Image:
    """An uploaded file opened lazily: only ``limits.image_formats`` are tried and its size is read from the header
    and checked; no pixel is decoded yet. Anything else raises ``ValueError`` (no internals echoed)."""
    if len(data) > limits.max_image_bytes:
        raise ValueError(f"file of {len(data)} bytes; the limit is {limits.max_image_bytes}")
    try:
        with warnings.catch_warnings():  # we check the size ourselves, with a lower limit than Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(limits.image_formats))
    except Exception:  # Pillow raises many types for bad files
        raise ValueError(f"not a readable {', '.join(limits.image_formats)} file") from None
    w, h = im.size
    if w * h > limits.max_pixels:
        im.close()
        raise ValueError(f"image of {w} x {h} pixels; the limit is {limits.max_pixels} pixels")
    return im


def decode_opened(im: Image.Image, limits: ServiceLimits) -> Image.Image:
    """The pixels of an ``open_upload`` image as RGB (closes ``im``); a damaged file raises ``ValueError``."""
    try:
        with im:
            return im.convert("RGB")
    except Exception:  # Pillow raises many types for truncated files
        raise ValueError(f"not a readable {', '.join(limits.image_formats)} file") from None


def decode_upload(data: bytes, limits: ServiceLimits) -> Image.Image:
    """An uploaded file as an RGB image, its format and size checked before any pixel is decoded."""
    return decode_opened(open_upload(data, limits), limits)


def pixel_affine(backbone: Backbone) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The model's input side S and its per-channel normalisation (mean, std), each (3, 1, 1), read off its
    preprocessing of a black and a white image (x_normalised = (x - mean) / std for x in [0, 1])."""
    black = backbone.preprocess(Image.new("RGB", (256, 256), (0, 0, 0)))  # (3, S, S) = -mean / std
    white = backbone.preprocess(Image.new("RGB", (256, 256), (255, 255, 255)))  # (1 - mean) / std
    if black.ndim != 3 or black.shape[-1] != black.shape[-2]:
        raise ValueError(f"{backbone.spec}: pixel prompts need a square (3, S, S) model input")
    std = 1.0 / (white - black).mean(dim=(1, 2), keepdim=True)
    mean = -black.mean(dim=(1, 2), keepdim=True) * std
    return int(black.shape[-1]), mean.float(), std.float()


class LocalBlackBox:
    """A black-box VLM over ``backbone`` with a hard query budget.

    Args:
        backbone: the served model.
        budget: query (and optional work) budget (``None`` = unlimited).
        name: public model name (defaults to the backbone spec).
        candidate_batch: the most candidate contexts that go through the text tower at once.
        max_sequences: the most prompts (candidates x classes) per text-tower pass (bounds memory at K = 1,000).
        precision: the served model's weights: None = ``backbone`` as it is; ``fp32``; ``bf16`` (a bfloat16 copy:
            about 4x faster on AMX CPUs, cosine >= 0.9999 to fp32 features); ``auto`` (bf16 where the device has
            bf16 matrix units).
        share_prefix: compute the prompt positions all classes share once per candidate (same scores up to
            float rounding; off only to measure what it saves).
        visual_prompts: accept visual prompt tokens (keeps the preprocessed pixels of every upload in memory:
            about 0.6 MB an image at 224 px). Needs a ViT image tower.
        pixel_prompts: accept per-image pixel prompts (keeps the pixels too). Any image tower.
        image_batch: images per image-tower forward (uploads, and visual prompts).
        limits: what one request may ask (validated before anything is charged).
        image_quota: the most images this box holds (None = no limit).
    """

    def __init__(
        self,
        backbone: Backbone,
        budget: QueryBudget | None = None,
        name: str | None = None,
        candidate_batch: int = 64,
        visual_prompts: bool = False,
        image_batch: int = 512,
        limits: ServiceLimits | None = None,
        image_quota: int | None = None,
        pixel_prompts: bool = False,
        max_sequences: int = 4096,
        precision: Precision | None = None,
        share_prefix: bool = True,
    ) -> None:
        self._backbone = backbone if precision is None else backbone.cast(resolve_precision(precision, backbone.device))
        self.budget = budget or QueryBudget(None)
        self.limits = limits or ServiceLimits()
        self.image_quota = image_quota
        self._features: dict[str, torch.Tensor] = {}
        self._pixels: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()  # this box's stores
        self._compute = FairTurns()  # model work, shared by forks (one backbone, hooks on its modules): slices
        self._owner = object()  # granted round-robin over the boxes (keys) that wait (``blackbox.turns``)
        visual_width = backbone.visual_width if visual_prompts else None
        if visual_prompts and visual_width is None:
            raise ValueError(f"{backbone.spec}: visual prompts need a ViT image tower")
        self._info = ModelInfo(
            name or backbone.spec,
            backbone.token_width,
            max_context=16,
            visual_width=visual_width,
            max_visual=16,
            limits=self.limits.to_json(),
            image_size=None,
        )
        self._affine: tuple[torch.Tensor, torch.Tensor] | None = None
        if pixel_prompts:
            size, mean, std = pixel_affine(backbone)
            self._affine = (mean, std)
            self._info = replace(self._info, image_size=size)
        self._keep_pixels = visual_prompts or pixel_prompts
        self.candidate_batch, self.image_batch, self.max_sequences = candidate_batch, image_batch, max_sequences
        self.share_prefix = share_prefix
        self.forwards = 0  # text-tower batches run (for tests and benchmarks)
        self.image_forwards = 0  # image-tower batches run for visual prompts

    def fork(self, budget: QueryBudget, image_quota: int | None = None) -> LocalBlackBox:
        """A box over the same model with its own images, budget and quota (one API key's namespace)."""
        box = object.__new__(LocalBlackBox)
        box.__dict__.update(self.__dict__)
        box.budget, box.image_quota = budget, image_quota
        box._features, box._pixels, box._lock, box._owner = {}, {}, threading.Lock(), object()
        box.forwards = box.image_forwards = 0
        return box

    def with_body_limit(self, max_body_bytes: int) -> None:
        """Tell clients the largest request body the service in front of this box accepts."""
        self._info = replace(self._info, max_body_bytes=max_body_bytes)

    def info(self) -> ModelInfo:
        return self._info

    def upload(self, images: list[bytes]) -> list[str]:
        """Encoded PNG/JPEG/WebP files -> content ids, in the order of cost: the count and the image quota first,
        then every new file's header (format, size, the request's pixel budget), then the decoding is charged as
        work (``ServiceLimits.decode_work``), then images are decoded one at a time and each is preprocessed at once,
        so memory holds one full-size image. A file that fails to decode stops the upload with ``ValueError``; the
        images before it stay (content ids: sending them again stores nothing twice)."""
        lim = self.limits
        if len(images) > lim.max_upload_images:
            raise ValueError(f"{len(images)} images in one upload; the limit is {lim.max_upload_images}")
        ids = [hashlib.sha256(data).hexdigest()[:24] for data in images]
        new: dict[str, int] = {}  # content id -> its first index in the request
        for i, image_id in enumerate(ids):
            if image_id not in self._features and image_id not in new:
                new[image_id] = i
        if self.image_quota is not None and len(self._features) + len(new) > self.image_quota:
            raise BudgetExceeded(len(new), len(self._features), self.image_quota, "image")
        opened: dict[str, Image.Image] = {}
        try:
            for image_id, i in new.items():
                try:
                    opened[image_id] = open_upload(images[i], lim)
                except ValueError as exc:
                    raise ValueError(f"image {i}: {exc}") from None
            pixels = sum(im.size[0] * im.size[1] for im in opened.values())
            if pixels > lim.max_upload_pixels:
                raise ValueError(
                    f"{pixels} pixels in one upload; the limit is {lim.max_upload_pixels}: send fewer images at once"
                )
            self.budget.charge(0, lim.decode_work(pixels))  # over a work limit: BudgetExceeded, nothing decoded
            order = list(opened)
            for start in range(0, len(order), self.image_batch):
                chunk = order[start : start + self.image_batch]
                tensors = []
                for image_id in chunk:
                    try:
                        rgb = decode_opened(opened.pop(image_id), lim)
                    except ValueError as exc:
                        raise ValueError(f"image {new[image_id]}: {exc}") from None
                    tensors.append(self._backbone.preprocess(rgb))  # (3, H, W); the full-size image is freed
                    del rgb
                batch = torch.stack(tensors)  # (B, 3, H, W)
                with self._compute.turn(self._owner), torch.no_grad():
                    feats = self._backbone.encode_images(batch).float().cpu()  # (B, D)
                self.budget.record_uploads(len(chunk))  # first: if the count cannot be stored, nor are the images
                with self._lock:
                    for image_id, f, px in zip(chunk, feats, batch, strict=True):
                        self._features[image_id] = f
                        if self._keep_pixels:
                            self._pixels[image_id] = px
        finally:
            for im in opened.values():
                im.close()
        return ids

    def upload_images(self, images: list[Image.Image]) -> list[str]:
        return self.upload([image_bytes(im) for im in images])

    def usage(self) -> Usage:
        b = self.budget
        return Usage(b.used, b.limit, len(self._features), b.work_used, b.work_limit, self.image_quota, b.uploads)

    def missing(self, ids: list[str]) -> int:
        """How many of ``ids`` were never uploaded to this box."""
        return sum(i not in self._features for i in ids)

    def predict(self, request: PredictRequest) -> np.ndarray:
        """Scores (C, N, K). Validated in full, then C queries (and C x N x K work) are charged, then computed;
        a failure or a non-finite result is refunded."""
        request.validate(self._info)
        missing = self.missing(request.image_ids)
        if missing:
            raise UnknownImages.count(missing, len(request.image_ids))
        prompts = self._prompt_embeddings(request)  # validates the context length and each prompt's fit
        self.budget.charge(request.n_candidates, request.n_values)  # atomic: over budget raises, nothing done
        try:
            images = torch.stack([self._features[i] for i in request.image_ids])  # (N, D)
            visual = None
            if request.visual_contexts is not None or request.pixel_prompts is not None:
                pixels = torch.stack([self._pixels[i] for i in request.image_ids])  # (N, 3, H, W)
                kind = "tokens" if request.visual_contexts is not None else "pixels"
                given = request.visual_contexts if kind == "tokens" else request.pixel_prompts
                visual = (pixels, torch.as_tensor(np.asarray(given, dtype=np.float32)), kind)
            with self._compute.turn(self._owner):  # slices: other keys compute between them
                scores = self._scores(images, *prompts, visual).float().numpy()
            if not np.isfinite(scores).all():
                raise ValueError("the contexts overflow the model (non-finite scores); nothing was charged")
        except BaseException:
            self.budget.refund(request.n_candidates, request.n_values)
            raise
        return scores

    # ---- text side --------------------------------------------------------------------------------------
    def _prompt_embeddings(
        self, request: PredictRequest
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        bb = self._backbone
        tokens = bb.tokenize([request.template.format(c) for c in request.classnames])  # (K, L)
        eot = bb.eot_index(tokens)  # (K,)
        full = (tokens[torch.arange(len(tokens)), eot] != bb.eot_token_id) | (eot >= tokens.shape[1] - 1)
        if bool(full.any()):  # tokenizers truncate silently: a prompt that reaches the last position was cut
            first = int(full.nonzero()[0, 0])
            raise ValueError(f"the prompt of classnames[{first}] does not fit the model's {tokens.shape[1]} tokens")
        tokens = tokens[:, : int(eot.max()) + 1]
        prefix = request.template.split("{}")[0].strip()
        n_prefix = int(bb.eot_index(bb.tokenize([prefix]))[0]) - 1 if prefix else 0  # words before the class name
        ctx = None
        if request.contexts is not None:
            ctx = torch.as_tensor(np.asarray(request.contexts, dtype=np.float32))  # (C, n_ctx, W)
            if ctx.shape[1] > n_prefix:
                raise ValueError(
                    f"template {request.template!r} has {n_prefix} context tokens before the class name; "
                    f"got a context of {ctx.shape[1]}"
                )
        return tokens, eot, ctx, int(request.mode == "add")

    @torch.no_grad()
    def _scores(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        eot: torch.Tensor,
        ctx: torch.Tensor | None,
        add: int,
        visual: tuple[torch.Tensor, torch.Tensor, str] | None,
    ) -> torch.Tensor:
        """Scores (C, N, K) from image features (N, D) or, with ``visual``, each candidate's own image features.
        Computed on the model's device (features in float32), returned on the CPU."""
        bb = self._backbone
        base = bb.embed_tokens(tokens).float()  # (K, L, W)
        images = images.to(bb.device)
        n_cand = len(ctx) if ctx is not None else len(visual[1]) if visual is not None else 1
        shared_text = None
        if ctx is None:
            shared_text = bb.encode_text_embeddings(base, eot).float()[None]  # (1, K, D)
            self.forwards += 1
        per_pass = max(1, min(self.candidate_batch, self.max_sequences // len(base)))  # candidates per pass
        shared = shared_prefix_length(tokens, eot)
        out = []
        for start in range(0, n_cand, per_pass):
            stop = min(start + per_pass, n_cand)
            text = shared_text if ctx is None else self._text_features(base, eot, ctx[start:stop], add, shared)
            assert text is not None
            img = images[None] if visual is None else self._prompted_features(visual, start, stop)
            c = max(text.shape[0], img.shape[0])  # text (c|1, K, D), images (c|1, N, D)
            scores = torch.einsum("cnd,ckd->cnk", img.expand(c, -1, -1), text.expand(c, -1, -1))
            out.append((bb.logit_scale * scores).cpu())
            self._compute.between(self._owner)
        return torch.cat(out)

    def _text_features(
        self, base: torch.Tensor, eot: torch.Tensor, ctx: torch.Tensor, add: int, shared: int
    ) -> torch.Tensor:
        """Class prompts (K, L, W) under candidate contexts (c, n_ctx, W) -> text features (c, K, D).

        The positions all K prompts share (start token, context, template words before the class name) are
        computed once per candidate (``Backbone.encode_text_shared_prefix``)."""
        bb = self._backbone
        c, n_ctx = ctx.shape[:2]
        k, length, width = base.shape
        embeds = base.expand(c, k, length, width).clone()  # (c, K, L, W)
        window = embeds[:, :, 1 : 1 + n_ctx]  # after the start token
        ctx = ctx.to(embeds.device)
        embeds[:, :, 1 : 1 + n_ctx] = window + ctx[:, None] if add else ctx[:, None].expand_as(window)
        self.forwards += 1
        p = shared if k > 1 and self.share_prefix else 0
        if p < 2:
            text = bb.encode_text_embeddings(embeds.view(-1, length, width), eot.repeat(c))
            return text.float().view(c, k, -1)
        return bb.encode_text_shared_prefix(embeds[:, 0, :p], embeds[:, :, p:], eot).float()  # (c, K, D)

    def _prompted_features(self, visual: tuple[torch.Tensor, torch.Tensor, str], start: int, stop: int) -> torch.Tensor:
        """Candidates start..stop's own image features (c, N, D), on the model's device."""
        pixels, prompts, kind = visual
        if kind == "tokens":
            return self._visual_features(pixels, prompts[start:stop])
        return self._pixel_features(pixels, prompts[start:stop])

    def _pixel_features(self, pixels: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, S, S) as normalised by the backbone, pixel prompts (c, N, 3, S, S) in [0, 1] units ->
        image features (c, N, D) of clamp(x + p, 0, 1), normalised again."""
        assert self._affine is not None
        mean, std = self._affine  # (3, 1, 1): x_normalised = (x - mean) / std
        raw = pixels * std + mean  # (N, 3, S, S) in [0, 1]
        rows = []
        for c in range(len(prompts)):
            cols = []
            for i in range(0, len(pixels), self.image_batch):
                x = ((raw[i : i + self.image_batch] + prompts[c, i : i + self.image_batch]).clamp(0, 1) - mean) / std
                cols.append(self._backbone.encode_images(x).float())  # on the model's device
                self.image_forwards += 1
                self._compute.between(self._owner)
            rows.append(torch.cat(cols))
        return torch.stack(rows)

    def _visual_features(self, pixels: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) under candidate visual prompts (c, n_v, W_v) -> image features (c, N, D)."""
        n = len(pixels)
        per = max(1, self.image_batch // n)  # candidates per forward when all N images fit in one batch
        rows = []
        for c0 in range(0, len(prompts), per):
            cols = []
            for i in range(0, n, self.image_batch):
                cols.append(
                    self._backbone.encode_images_prompted(pixels[i : i + self.image_batch], prompts[c0 : c0 + per])
                )
                self.image_forwards += 1
                self._compute.between(self._owner)
            rows.append(torch.cat(cols, 1).float())  # on the model's device
        return torch.cat(rows)
