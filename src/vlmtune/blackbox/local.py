"""``LocalBlackBox``: the black-box service logic over any backbone, in process.

The server side of the boundary (it may use a backbone; black-box methods may not import this module's
dependencies). Images are encoded once at upload and kept by content hash, so a query costs only text-tower
work; candidates of a request are batched through the text tower together. Every forward for a request is
charged to the ``QueryBudget`` first; outputs are detached numpy arrays.
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
    """

    def __init__(
        self, backbone: Backbone, budget: QueryBudget | None = None, name: str | None = None, candidate_batch: int = 64
    ) -> None:
        self._backbone = backbone
        self.budget = budget or QueryBudget(None)
        self._features: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._info = ModelInfo(name or backbone.spec, backbone.token_width, max_context=16)
        self.candidate_batch = candidate_batch
        self.forwards = 0  # text-tower batches run (for tests and benchmarks)

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
                for (image_id, _), f in zip(todo, feats, strict=True):
                    self._features[image_id] = f
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
        return self._scores(images, *prompts).float().numpy()

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
        self, images: torch.Tensor, tokens: torch.Tensor, eot: torch.Tensor, ctx: torch.Tensor | None, add: int
    ) -> torch.Tensor:
        bb = self._backbone
        base = bb.embed_tokens(tokens).float().cpu()  # (K, L, W)
        k, length, width = base.shape
        scale = bb.logit_scale
        if ctx is None:
            text = bb.encode_text_embeddings(base.to(bb.device), eot)  # (K, D)
            self.forwards += 1
            return (scale * images @ text.float().cpu().T)[None]  # (1, N, K)
        out = []
        for start in range(0, ctx.shape[0], self.candidate_batch):
            c = ctx[start : start + self.candidate_batch]  # (c, n_ctx, W)
            n_ctx = c.shape[1]
            embeds = base.expand(c.shape[0], k, length, width).clone()  # (c, K, L, W)
            window = embeds[:, :, 1 : 1 + n_ctx]  # after the start token
            embeds[:, :, 1 : 1 + n_ctx] = window + c[:, None] if add else c[:, None].expand_as(window)
            text = bb.encode_text_embeddings(embeds.view(-1, length, width).to(bb.device), eot.repeat(c.shape[0]))
            self.forwards += 1
            text = text.float().cpu().view(c.shape[0], k, -1)  # (c, K, D)
            out.append(scale * torch.einsum("nd,ckd->cnk", images, text))  # (c, N, K)
        return torch.cat(out)
