"""Prompt assembly and training shared by the white-box prompt learners (CoOp, CoCoOp, TMM).

``PromptAssembler`` builds, for K class names, the token-embedding sequences
``[SOT] v_1 ... v_n <class-name tokens> . [EOT]`` (CoOp's prompt p_i = v_1; ...; v_n; e_i) with the learnable
context vectors at the end / middle / front positions, and runs them through the backbone's differentiable text
path. Context may be shared (n, W), class-specific (K, n, W) or per image and class (B, K, n, W): CoCoOp's
image-conditioned and TMM's class-aware prompts are the last case, batched over images and classes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.backbones.base import Backbone
from vlmtune.methods.api import TrainingHooks
from vlmtune.schedule import Schedule, make_optimizer, set_lr

log = logging.getLogger(__name__)
Position = Literal["end", "middle", "front"]

# Per-element RMS of CLIP's token embeddings (rows have a norm of about 0.55 at width 512). The papers' step sizes
# and init scales belong to this scale; a backbone within 4x of it uses them exactly (token_scale = 1).
CLIP_TOKEN_RMS = 0.024
TOKEN_SCALE_BAND = 4.0
TOKEN_SCALE_DOC = "context scale vs CLIP's token embeddings; none = measured (1 within 4x of CLIP's)"
_PROBE_TEXT = "a photo of a dog, a cat, a car and a small red flower on the table."


def token_ratio(backbone: Backbone) -> float:
    """RMS of the backbone's token embeddings over CLIP's (measured on a probe sentence, without SOT/EOT)."""
    tokens = backbone.tokenize([_PROBE_TEXT])
    eot = int(backbone.eot_index(tokens)[0])
    with torch.no_grad():
        words = backbone.embed_tokens(tokens)[0, 1:eot].float()  # (T, W)
    return float(words.pow(2).mean().sqrt()) / CLIP_TOKEN_RMS


def token_scale(backbone: Backbone, given: float | None = None) -> float:
    """How much larger the backbone's token embeddings are than CLIP's (1.0 for CLIP-like scales).

    Prompt learners keep their context in CLIP's units and place ``token_scale * ctx`` in the prompt, so the
    papers' learning rates and init scales act the same on a backbone whose embeddings are, say, 20x larger
    (a user's own dual encoder with a default ``nn.Embedding``), and are exactly the papers' on CLIP.
    """
    if given is not None:
        return float(given)
    ratio = token_ratio(backbone)
    if 1 / TOKEN_SCALE_BAND <= ratio <= TOKEN_SCALE_BAND:
        return 1.0
    log.warning(
        "%s: token embeddings are %.3gx CLIP's scale; prompt contexts, their init and step sizes are scaled to "
        "match (set token_scale=1 to use the papers' values unchanged)",
        backbone.spec,
        ratio,
    )
    return ratio


# CoOp's schedule: epochs by shots (50 for 1 shot, 100 for 2-4, 200 for 8-16)
COOP_EPOCHS = ((8, 200), (2, 100), (1, 50))


def coop_epochs(shots: int) -> int:
    return next((e for s, e in COOP_EPOCHS if shots >= s), 50)


class PromptAssembler:
    """Class prompts with ``n_ctx`` learnable slots, ready for ``Backbone.encode_text_embeddings``.

    Args:
        backbone: the white-box backbone (tokenizer, token embeddings, text tower).
        classnames: K class names.
        n_ctx: number of context vectors.
        position: ``"end"`` (context, then the class name), ``"middle"`` (half the context on each side of the
            name) or ``"front"`` (the name, then the context), as CoOp's class-token position.
        scale: contexts are in CLIP's token-embedding units; ``scale * ctx`` enters the prompt (``token_scale``).
    """

    def __init__(
        self, backbone: Backbone, classnames: Sequence[str], n_ctx: int, position: str = "end", scale: float = 1.0
    ) -> None:
        if position not in ("end", "middle", "front"):
            raise ValueError(f"class token position must be end, middle or front, not {position!r}")
        self.backbone, self.n_ctx, self.position, self.scale = backbone, n_ctx, position, float(scale)
        tokens = backbone.tokenize([f"{name}." for name in classnames])  # (K, L): SOT name . EOT pad
        eot = backbone.eot_index(tokens)
        longest = int(eot.max()) + 1 + n_ctx
        if longest > backbone.context_length:
            raise ValueError(
                f"a prompt of {n_ctx} context vectors and the longest class name needs {longest} token positions; "
                f"{backbone.spec} has {backbone.context_length}: use a smaller n_ctx"
            )
        sot = int(tokens[0, 0])
        rows, slots = [], []
        for k in range(len(classnames)):
            body = tokens[k, 1 : int(eot[k])].tolist()  # class-name tokens and the period
            name, period = body[:-1], body[-1:]
            first = n_ctx // 2 if position == "middle" else (n_ctx if position == "end" else 0)
            before = [sot] + [0] * first
            if position == "front":
                ids = [sot, *name, *([0] * n_ctx), *period]
                slot = list(range(1 + len(name), 1 + len(name) + n_ctx))
            else:
                ids = [*before, *name, *([0] * (n_ctx - first)), *period]
                slot = list(range(1, 1 + first)) + list(range(1 + first + len(name), 1 + n_ctx + len(name)))
            rows.append([*ids, backbone.eot_token_id])
            slots.append(slot)
        length = max(len(r) for r in rows)
        token_ids = torch.zeros(len(rows), length, dtype=torch.long)
        for k, r in enumerate(rows):
            token_ids[k, : len(r)] = torch.tensor(r)
        self.eot = torch.tensor([len(r) - 1 for r in rows])  # (K,)
        self.slots = torch.tensor(slots, dtype=torch.long)  # (K, n_ctx): where the context vectors go
        with torch.no_grad():
            self.base = backbone.embed_tokens(token_ids).float().cpu()  # (K, L', W), context slots hold a placeholder

    @property
    def num_classes(self) -> int:
        return int(self.base.shape[0])

    def embeds(self, ctx: torch.Tensor) -> torch.Tensor:
        """Context (n, W) | (K, n, W) | (..., K, n, W) -> prompt embeddings (..., K, L', W)."""
        k, length, width = self.base.shape
        ctx = ctx * self.scale if self.scale != 1.0 else ctx  # CLIP units -> the backbone's token scale
        if ctx.dim() == 2:
            ctx = ctx.expand(k, -1, -1)  # (K, n, W)
        lead = ctx.shape[:-3]
        base = self.base.to(ctx.device, ctx.dtype).expand(*lead, k, length, width)
        index = self.slots.to(ctx.device)[..., None].expand(*lead, k, self.n_ctx, width)
        return base.scatter(-2, index, ctx)  # (..., K, L', W): differentiable in ctx

    def encode(self, ctx: torch.Tensor) -> torch.Tensor:
        """Context as in ``embeds`` -> L2-normalised text features (..., K, D)."""
        e = self.embeds(ctx)
        lead = e.shape[:-2]
        eot = self.eot.to(e.device).expand(*lead)
        feats = self.backbone.encode_text_embeddings(e.reshape(-1, *e.shape[-2:]), eot.reshape(-1))
        return feats.view(*lead, -1)


def init_context(
    backbone: Backbone,
    n_ctx: int,
    init: str | None,
    generator: torch.Generator,
    classes: int = 0,
    std: float = 0.02,
    scale: float = 1.0,
) -> torch.Tensor:
    """CoOp's context init: the embeddings of ``init`` words (e.g. "a photo of a"), else N(0, std), in CLIP's
    token units (the words' embeddings divided by ``scale``, see ``token_scale``).

    Returns (n_ctx, W), or (classes, n_ctx, W) class-specific context when ``classes`` > 0.
    """
    shape = (classes, n_ctx, backbone.token_width) if classes else (n_ctx, backbone.token_width)
    if init:
        tokens = backbone.tokenize([init])
        n_words = int(backbone.eot_index(tokens)[0]) - 1
        if n_words != n_ctx:
            raise ValueError(f"ctx_init {init!r} has {n_words} tokens; n_ctx is {n_ctx}")
        with torch.no_grad():
            words = backbone.embed_tokens(tokens)[0, 1 : 1 + n_ctx].float().cpu() / scale  # (n_ctx, W)
        return words.expand(shape).clone()
    return torch.randn(shape, generator=generator) * std


def train_sgd_cosine(
    params: list[nn.Parameter],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    schedule: Schedule,
    generator: torch.Generator,
    hooks: TrainingHooks | None = None,
    on_epoch: Callable[[int], dict[str, float] | None] | None = None,
) -> None:
    """Minimise ``loss_fn(batch_index)`` over shuffled mini-batches of range(n) with ``schedule``; each epoch's
    mean loss (and what ``on_epoch(epoch)`` returns, e.g. a validation accuracy) goes to ``hooks.step``."""
    opt = make_optimizer(params, schedule)
    for epoch in range(schedule.epochs):
        lr = set_lr(opt, schedule, epoch)
        order = torch.randperm(n, generator=generator)
        total, batches = 0.0, 0
        for start in range(0, n, schedule.batch_size):
            loss = loss_fn(order[start : start + schedule.batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, batches = total + float(loss.detach()), batches + 1
        extra = (on_epoch(epoch) if on_epoch is not None else None) or {}
        if hooks is not None:
            hooks.step(epoch + 1, schedule.epochs, "epoch", loss=total / max(1, batches), lr=lr, **extra)


def cosine_logits(scale: float, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """s * cos: image (B, D) with shared text (K, D) -> (B, K); with per-image text (B, K, D) -> (B, K)."""
    image = F.normalize(image, dim=-1)
    text = F.normalize(text, dim=-1)
    if text.dim() == 2:
        return scale * image @ text.T
    return scale * torch.einsum("bd,bkd->bk", image, text)


def mlp(d_in: int, d_out: int, reduction: int = 16) -> nn.Sequential:
    """CoCoOp's Meta-Net block: Linear-ReLU-Linear with a d_in / reduction bottleneck."""
    hidden = max(1, d_in // reduction)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))
