"""Shared-prefix text encoding and compute precision: the text tower at the cost a black-box service pays.

K class prompts under one candidate context share their first P tokens ([SOT, context, template words before the
class name]). In a causal text tower the states at positions < P depend on those positions alone, so they are
computed once per candidate and every class's suffix attends to their keys and values
(``encode_shared_prefix``): exact up to float rounding, about half the tokens for "a photo of a {}.".

A backbone offers this by describing its text tower as a ``TextStack`` of pre-norm blocks (``Backbone.text_stack``);
one that does not is encoded whole (same results, no saving).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.settings import Precision

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "auto")


@dataclass(frozen=True)
class PreNormBlock:
    """One pre-norm transformer block: x + ls_1(out(attn(qkv(ln_1(x))))), then x + ls_2(mlp(ln_2(x)))."""

    ln_1: nn.Module
    qkv: Callable[[torch.Tensor], torch.Tensor]  # (..., W) -> (..., 3W) as [q; k; v]
    out: nn.Module  # (..., W) -> (..., W)
    heads: int
    ln_2: nn.Module
    mlp: nn.Module
    ls_1: nn.Module = field(default_factory=nn.Identity)
    ls_2: nn.Module = field(default_factory=nn.Identity)


@dataclass(frozen=True)
class TextStack:
    """A causal text tower as positions + pre-norm blocks + head (what prefix sharing needs to know).

    Attributes:
        positional: positional embeddings (L, W), added to the token embeddings.
        blocks: the transformer blocks, in order.
        head: states at the end-of-text token (M, W) -> unnormalised text features (M, D) (final norm, projection).
    """

    positional: torch.Tensor
    blocks: Sequence[PreNormBlock]
    head: Callable[[torch.Tensor], torch.Tensor]


def shared_prefix_length(tokens: torch.Tensor, eot: torch.Tensor) -> int:
    """Leading positions where all rows of ``tokens`` (K, L) agree, before any end-of-text token (K,)."""
    same = (tokens == tokens[:1]).all(0).int()  # (L,)
    return min(int(same.cumprod(0).sum()), int(eot.min()))


def _suffix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, causal: torch.Tensor
) -> torch.Tensor:
    """Suffix queries q, keys k, values v (C, K, S, H, d) over the candidate's prefix keys / values (C, P, H, d)
    and, causally, their own suffix -> (C, K, S, H, d). The prefix is broadcast over the K classes, never copied."""
    scale = q.shape[-1] ** -0.5
    to_prefix = torch.einsum("ckshd,cphd->ckhsp", q, kp) * scale  # (C, K, H, S, P)
    to_self = torch.einsum("ckshd,ckthd->ckhst", q, k) * scale  # (C, K, H, S, S)
    to_self = to_self.masked_fill(~causal, float("-inf"))
    w = torch.cat([to_prefix, to_self], -1).softmax(-1)  # (C, K, H, S, P+S)
    p = kp.shape[1]
    out = torch.einsum("ckhsp,cphd->ckshd", w[..., :p], vp)
    return out + torch.einsum("ckhst,ckthd->ckshd", w[..., p:], v)


def encode_shared_prefix(
    stack: TextStack, prefix: torch.Tensor, suffix: torch.Tensor, eot: torch.Tensor
) -> torch.Tensor:
    """Candidates' shared prefixes (C, P, W) and class suffixes (C, K, S, W) with end-of-text positions (K,)
    counted in the whole prompt (all >= P) -> unnormalised text features (C, K, D).

    Classes are grouped by prompt length, so that no suffix is padded: each group runs only up to its own
    end-of-text token (a third fewer tokens than padding to the longest for Caltech-101's names)."""
    c, p, w = prefix.shape
    dtype = stack.positional.dtype
    xp = prefix.to(dtype) + stack.positional[:p]  # (C, P, W)
    lengths = (eot - p + 1).to(suffix.device)  # suffix tokens up to each class's EOT, (K,)
    groups = [(lengths == n).nonzero().squeeze(1) for n in lengths.unique().tolist()]
    xs = []  # per group: (C * K_g, S_g, W)
    for idx in groups:
        n = int(lengths[idx[0]])
        xs.append((suffix[:, idx, :n].to(dtype) + stack.positional[p : p + n]).flatten(0, 1))
    for blk in stack.blocks:
        h = blk.heads
        d = w // h
        qp, kp, vp = blk.qkv(blk.ln_1(xp)).view(c, p, 3, h, d).unbind(2)  # each (C, P, H, d)
        for j, x in enumerate(xs):
            n = x.shape[1]
            q, k, v = blk.qkv(blk.ln_1(x)).view(c, -1, n, 3, h, d).unbind(3)  # each (C, K_g, S_g, H, d)
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()  # suffix i sees suffix j <= i
            x = x + blk.ls_1(blk.out(_suffix_attention(q, k, v, kp, vp, causal).reshape(x.shape)))
            xs[j] = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        att_p = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (qp, kp, vp)), is_causal=True)
        xp = xp + blk.ls_1(blk.out(att_p.transpose(1, 2).reshape(c, p, w)))  # (C, P, W)
        xp = xp + blk.ls_2(blk.mlp(blk.ln_2(xp)))
    feats = [stack.head(x[:, -1]).view(c, len(idx), -1) for x, idx in zip(xs, groups, strict=True)]  # at the EOT
    out = feats[0].new_empty(c, len(eot), feats[0].shape[-1])  # (C, K, D)
    for f, idx in zip(feats, groups, strict=True):
        out[:, idx] = f
    return out


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether ``device`` has bfloat16 matrix units: AMX on a CPU, bf16 support on a CUDA GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    caps = getattr(torch.cpu, "get_capabilities", lambda: {})()
    return device.type == "cpu" and bool(caps.get("amx_bf16"))


def resolve_precision(precision: Precision, device: torch.device | str) -> torch.dtype:
    """The weights' dtype a precision name asks for on ``device`` (``auto``: bf16 where it is fast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32
