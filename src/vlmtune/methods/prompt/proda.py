"""ProDA: prompt distribution learning (Lu et al., CVPR 2022; a baseline of papers 000-002).

A collection of P learnable prompts, each with its own n_ctx context vectors and a class-name position (a quarter
in front, a quarter in the middle, half at the end). For class j the P prompts give text features w_j1..w_jP,
modelled as a Gaussian N(mu_j, Sigma_j) with the sample mean and covariance. Training minimises the upper bound of
the expected cross-entropy over that Gaussian (the surrogate loss):

    L = -log [ exp(tau mu_y^T f) / sum_j exp(tau mu_j^T f + tau^2 / 2 * f^T (Sigma_jj + Sigma_yy - 2 Sigma_jy) f) ]

plus a diversity term: the mean |cosine| between the prompts' class-free features G([SOT] v_p . [EOT]).
Inference uses the mean: P(y = j | x) = softmax_j(tau mu_j^T f). With the sample covariance of P prompts,
f^T (Sigma_jj + Sigma_yy - 2 Sigma_jy) f = 1/P sum_p (a_jp - a_yp)^2, a_jp = (w_jp - mu_j)^T f: exact and
O(B K P) (no D x D matrix). ProDA's official code is not public: its defaults here are read from the paper, and the
choices it leaves open are recorded in docs/fidelity.md.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from vlmtune.features.extract import FeatureSet
from vlmtune.methods.api import Task
from vlmtune.methods.common.prompt import TOKEN_SCALE_DOC, PromptAssembler, init_context
from vlmtune.methods.common.prompt_classifier import (
    PromptClassifier,
    PromptMethod,
    prompt_settings,
    schedule_for,
    train_prompt_classifier,
)
from vlmtune.methods.options import method_config, option
from vlmtune.methods.registry import register_method

Positions = Literal["mixed", "end"]


@method_config
class ProDAConfig:
    n_prompts: int = option(32, "P, the prompts of the collection (paper: 32)", ge=2)
    n_ctx: int = option(16, "context vectors of each prompt (paper: 16)", ge=1)
    positions: Positions = option(
        "mixed", "class-name positions: mixed = 1/4 front, 1/4 middle, 1/2 end (paper); end = all at the end"
    )
    covariance: Literal["full", "diagonal"] = option(
        "full", "full = the sample covariance of the P prompts (paper's Gaussian); diagonal = per-dimension variances"
    )
    diversity: float = option(1.0, "weight of the diversity term (mean |cos| between class-free prompts)", ge=0)
    prompt_batch: int | None = option(None, "prompts per step, a random subset (none = all P)", ge=2)
    lr: float = option(0.002, "SGD learning rate at batch 32 (CoOp's schedule)", gt=0)
    epochs: int | None = option(None, "epochs; none = by shots (50 / 100 / 200, CoOp's)", ge=1)
    batch_size: int = option(32, "images per step", ge=1)
    scale_lr: bool = option(True, "batch_size != 32: lr x batch_size / 32 (linear scaling rule)")
    token_scale: float | None = option(None, TOKEN_SCALE_DOC, gt=0)


def position_counts(n_prompts: int, positions: str) -> dict[str, int]:
    """How many prompts put the class name in front, in the middle and at the end (in that order of ``ctx``)."""
    if positions == "end":
        return {"end": n_prompts}
    quarter = n_prompts // 4
    return {"front": quarter, "middle": quarter, "end": n_prompts - 2 * quarter}


class ProDAClassifier(PromptClassifier):
    """P prompts' contexts ``ctx`` (P, n, W); logits from the mean text feature mu_j of each class."""

    def bind(self, backbone: Any) -> ProDAClassifier:
        if self._backbone is backbone:
            return self
        super().bind(backbone)  # the base assembler ("end"): also used for the class-free prompts' layout
        n_ctx, scale = self.settings["n_ctx"], self.settings.get("token_scale", 1.0)
        start, groups = 0, []
        for position, count in position_counts(self.settings["n_prompts"], self.settings["positions"]).items():
            if count:
                assembler = PromptAssembler(backbone, self.classnames, n_ctx, position, scale)
                groups.append((slice(start, start + count), assembler))
            start += count
        self._groups = groups
        self._class_free = PromptAssembler(backbone, [""], n_ctx, "end", scale)  # [SOT] v_1..v_n . [EOT]
        return self

    def prompt_features(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised text features w_jp of the prompts ``index`` (all by default) -> (P', K, D)."""
        _ = self.assembler  # raises if unbound
        k = len(self.classnames)
        parts = []
        for span, assembler in self._groups:
            ids = torch.arange(span.start, span.stop, device=self.ctx.device)
            if index is not None:
                ids = ids[torch.isin(ids, index.to(ids.device))]
            for chunk in ids.split(max(1, self.eval_prompts // k)) if not torch.is_grad_enabled() else [ids]:
                if len(chunk):
                    ctx = self.ctx[chunk]  # (p, n, W)
                    parts.append(assembler.encode(ctx[:, None].expand(-1, k, -1, -1)))  # (p, K, D)
        return F.normalize(torch.cat(parts), dim=-1)

    def encode_context(self) -> torch.Tensor:
        return self.prompt_features().mean(dim=0)  # mu_j: (K, D)

    def class_free_features(self, index: torch.Tensor) -> torch.Tensor:
        """G([SOT] v_p . [EOT]) of the prompts ``index`` -> (P', D), L2-normalised."""
        return F.normalize(self._class_free.encode(self.ctx[index][:, None])[:, 0], dim=-1)


def gaussian_logits(
    scale: float, f: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, covariance: str = "full"
) -> torch.Tensor:
    """The surrogate's logits: tau mu_j^T f + tau^2 / 2 f^T (Sigma_jj + Sigma_yy - 2 Sigma_jy) f -> (B, K).

    f: (B, D) normalised image features; w: (P, K, D) the prompts' normalised text features; labels: (B,).
    """
    mu = w.mean(dim=0)  # (K, D)
    centred = w - mu  # (P, K, D)
    rows = torch.arange(len(f), device=f.device)
    if covariance == "full":
        a = torch.einsum("bd,pkd->bkp", f, centred)  # a_jp = (w_jp - mu_j)^T f: (B, K, P)
        spread = (a - a[rows, labels][:, None]).pow(2).mean(dim=-1)  # 1/P sum_p (a_jp - a_yp)^2: (B, K)
    else:  # Sigma_jk restricted to its diagonal in d: sum_d f_d^2 1/P sum_p (c_jpd - c_ypd)^2
        f2 = f.pow(2)
        own = torch.einsum("bd,pkd->bk", f2, centred.pow(2))  # (B, K)
        c_y = centred[:, labels]  # (P, B, D)
        cross = torch.einsum("bd,pkd,pbd->bk", f2, centred, c_y)
        spread = (own + own[rows, labels][:, None] - 2 * cross) / w.shape[0]
    return scale * f @ mu.T + 0.5 * scale**2 * spread  # Eq. of the surrogate loss


def diversity_loss(features: torch.Tensor) -> torch.Tensor:
    """Mean |cos| between different prompts' class-free features (P', D) (0 with fewer than two)."""
    p = len(features)
    if p < 2:
        return features.new_zeros(())
    cos = features @ features.T
    return cos[~torch.eye(p, dtype=torch.bool, device=cos.device)].abs().mean()


@register_method("proda")
class ProDA(PromptMethod):
    """ProDA: a collection of prompts whose class features are modelled as a Gaussian; surrogate loss on it."""

    config_cls = ProDAConfig
    classifier = ProDAClassifier
    paper_batch = 32
    summary = "ProDA: a distribution of P prompts per dataset (Gaussian surrogate loss + diversity)"

    def fit(self, handle: Any, task: Task, *, generator: torch.Generator) -> ProDAClassifier:
        cfg = self.config
        train = task.train
        if not isinstance(train, FeatureSet) or len(train) == 0:
            raise ValueError("proda needs labelled training features")
        settings = prompt_settings(handle, cfg.n_ctx, "end", cfg.token_scale)
        settings |= {"n_prompts": cfg.n_prompts, "positions": cfg.positions, "scale": handle.logit_scale}
        # P contexts (P, n, W) drawn N(0, 0.02), CoOp's random init (init_context's class axis is the prompt axis)
        ctx = init_context(handle, cfg.n_ctx, None, generator, classes=cfg.n_prompts, scale=settings["token_scale"])
        clf = ProDAClassifier(task.classnames, ctx, settings).bind(handle)
        batch = cfg.prompt_batch or cfg.n_prompts

        def surrogate(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            chosen = torch.randperm(cfg.n_prompts, generator=generator)[:batch] if batch < cfg.n_prompts else None
            w = clf.prompt_features(chosen)  # (P', K, D)
            logits = gaussian_logits(clf.scale, F.normalize(features, dim=-1), w, labels, cfg.covariance)
            loss = F.cross_entropy(logits, labels)
            if cfg.diversity > 0:
                which = chosen if chosen is not None else torch.arange(cfg.n_prompts)
                loss = loss + cfg.diversity * diversity_loss(clf.class_free_features(which.to(clf.ctx.device)))
            return loss

        schedule = schedule_for(cfg, task, self.paper_batch)
        train_prompt_classifier(clf, handle, train, schedule, generator, self.hooks, loss=surrogate)
        return clf
