"""``LocalBlackBox``: the black-box service logic over any backbone, in process.

The server side of the boundary (it may use a backbone; black-box methods may not import this module's
dependencies). Images are encoded once at upload and kept by content hash, so a query costs only text-tower
work; candidates of a request are batched through the text tower together. Every forward for a request is
charged to the ``QueryBudget`` first; outputs are detached numpy arrays.

With ``visual_prompts=True`` (ViT backbones) the preprocessed pixels are kept as well, and a request may carry
visual prompt tokens: then every image is encoded again under every candidate's tokens (C x N image forwards,
the cost CraFT's App. B reports for "+ vp").
"""

from __future__ import annotations

import hashlib
import io
import threading

import numpy as np
import torch
from PIL import Image

from vlmtune.backbones.base import Backbone
from vlmtune.blackbox.api import ModelInfo, PredictRequest, QueryBudget, Usage, image_bytes


class LocalBlackBox:
    """A black-box VLM over ``backbone`` with a hard query budget.

    Args:
        backbone: the served model.
        budget: query budget (``None`` = unlimited).
        name: public model name (defaults to the backbone spec).
        candidate_batch: how many candidate contexts go through the text tower at once.
        visual_prompts: accept visual prompt tokens (keeps the preprocessed pixels of every upload in memory:
            about 0.6 MB an image at 224 px). Needs a ViT image tower.
        image_batch: images per image-tower forward when visual prompts are scored.
    """

    def __init__(
        self,
        backbone: Backbone,
        budget: QueryBudget | None = None,
        name: str | None = None,
        candidate_batch: int = 64,
        visual_prompts: bool = False,
        image_batch: int = 512,
    ) -> None:
        self._backbone = backbone
        self.budget = budget or QueryBudget(None)
        self._features: dict[str, torch.Tensor] = {}
        self._pixels: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        visual_width = backbone.visual_width if visual_prompts else None
        if visual_prompts and visual_width is None:
            raise ValueError(f"{backbone.spec}: visual prompts need a ViT image tower")
        self._info = ModelInfo(
            name or backbone.spec, backbone.token_width, max_context=16, visual_width=visual_width, max_visual=16
        )
        self.candidate_batch, self.image_batch = candidate_batch, image_batch
        self.forwards = 0  # text-tower batches run (for tests and benchmarks)
        self.image_forwards = 0  # image-tower batches run for visual prompts

    def info(self) -> ModelInfo:
        return self._info

    def upload(self, images: list[bytes]) -> list[str]:
        ids, todo = [], []
        for data in images:
            image_id = hashlib.sha256(data).hexdigest()[:24]
            ids.append(image_id)
            if image_id not in self._features:
                todo.append((image_id, data))
        if todo:
            try:
                batch = torch.stack(
                    [self._backbone.preprocess(Image.open(io.BytesIO(d)).convert("RGB")) for _, d in todo]
                )
            except Exception as exc:  # any undecodable upload is the client's error
                raise ValueError(f"cannot decode uploaded image: {exc}") from exc
            with torch.no_grad():
                feats = self._backbone.encode_images(batch).float().cpu()  # (B, D)
            with self._lock:
                for (image_id, _), f, px in zip(todo, feats, batch, strict=True):
                    self._features[image_id] = f
                    if self._info.visual_width is not None:
                        self._pixels[image_id] = px
        return ids

    def upload_images(self, images: list[Image.Image]) -> list[str]:
        return self.upload([image_bytes(im) for im in images])

    def usage(self) -> Usage:
        return Usage(self.budget.used, self.budget.limit, images=len(self._features))

    def has_images(self, ids: list[str]) -> list[str]:
        """The ids of ``ids`` that were never uploaded."""
        return [i for i in ids if i not in self._features]

    def predict(self, request: PredictRequest, budget: QueryBudget | None = None) -> np.ndarray:
        """Scores (C, N, K); ``budget`` (default: the box's own) is charged C queries before any model work."""
        request.validate(self._info)
        missing = self.has_images(request.image_ids)
        if missing:
            raise KeyError(f"unknown image ids: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        prompts = self._prompt_embeddings(request)  # validates context length too
        (budget or self.budget).charge(request.n_candidates)  # atomic: over budget raises before any model work
        images = torch.stack([self._features[i] for i in request.image_ids])  # (N, D)
        visual = None
        if request.visual_contexts is not None:
            pixels = torch.stack([self._pixels[i] for i in request.image_ids])  # (N, 3, H, W)
            visual = (pixels, torch.as_tensor(np.asarray(request.visual_contexts, dtype=np.float32)))
        return self._scores(images, *prompts, visual).float().numpy()

    # ---- text side --------------------------------------------------------------------------------------
    def _prompt_embeddings(
        self, request: PredictRequest
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        bb = self._backbone
        tokens = bb.tokenize([request.template.format(c) for c in request.classnames])  # (K, L)
        eot = bb.eot_index(tokens)  # (K,)
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
        visual: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Scores (C, N, K) from image features (N, D) or, with ``visual``, each candidate's own image features."""
        bb = self._backbone
        base = bb.embed_tokens(tokens).float().cpu()  # (K, L, W)
        n_cand = len(ctx) if ctx is not None else len(visual[1]) if visual is not None else 1
        shared_text = None
        if ctx is None:
            shared_text = bb.encode_text_embeddings(base.to(bb.device), eot).float().cpu()[None]  # (1, K, D)
            self.forwards += 1
        out = []
        for start in range(0, n_cand, self.candidate_batch):
            stop = min(start + self.candidate_batch, n_cand)
            text = shared_text if ctx is None else self._text_features(base, eot, ctx[start:stop], add)  # (c|1, K, D)
            img = images[None] if visual is None else self._visual_features(visual[0], visual[1][start:stop])
            c = max(text.shape[0], img.shape[0])  # (c|1, N, D)
            out.append(bb.logit_scale * torch.einsum("cnd,ckd->cnk", img.expand(c, -1, -1), text.expand(c, -1, -1)))
        return torch.cat(out)

    def _text_features(self, base: torch.Tensor, eot: torch.Tensor, ctx: torch.Tensor, add: int) -> torch.Tensor:
        """Class prompts (K, L, W) under candidate contexts (c, n_ctx, W) -> text features (c, K, D)."""
        bb = self._backbone
        c, n_ctx = ctx.shape[:2]
        k, length, width = base.shape
        embeds = base.expand(c, k, length, width).clone()  # (c, K, L, W)
        window = embeds[:, :, 1 : 1 + n_ctx]  # after the start token
        embeds[:, :, 1 : 1 + n_ctx] = window + ctx[:, None] if add else ctx[:, None].expand_as(window)
        text = bb.encode_text_embeddings(embeds.view(-1, length, width).to(bb.device), eot.repeat(c))
        self.forwards += 1
        return text.float().cpu().view(c, k, -1)

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
            rows.append(torch.cat(cols, 1).float().cpu())
        return torch.cat(rows)
