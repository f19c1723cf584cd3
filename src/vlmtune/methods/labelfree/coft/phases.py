"""The two phases of CoFT / CoFT+ (Wang et al., paper 003), written once for both methods.

Phase I (Sec. 3.1): a ``DualPromptModel`` = a tunable copy of the backbone with visual prompts (VPT) + two learnable
text contexts, positive and negative (Eq. 2-3), trained on top-K pseudo-labels with L1 + lambda L2 (Eq. 4-6).
Phase II (Sec. 3.2): ``collaborative_filter`` (model i labels, model j validates with its dual prompts), then
``train_fft``: the whole image tower + an FC head (Eq. 7) on a clean set, with CoFT+'s momentum contrast over all
images (Eq. 8-10) when ``MoCoSettings`` are given.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.backbones.base import Backbone
from vlmtune.backbones.tuning import TowerTuning, tunable_copy
from vlmtune.errors import VlmtuneError
from vlmtune.methods.api import Task, TrainingHooks
from vlmtune.methods.common.prompt import PromptAssembler, init_context, token_scale
from vlmtune.methods.common.pseudo import PseudoLabels
from vlmtune.methods.common.tower import TowerClassifier, TowerHead, draw_seed, pseudo_sources, train_tower_round
from vlmtune.pixels import (
    EMAEncoder,
    LabelledViews,
    LossModule,
    MoCoQueue,
    ViewDataset,
    encode_all,
    make_loader,
    train_pixels,
)
from vlmtune.pixels import view as make_view
from vlmtune.schedule import Schedule

Eq5 = Literal["consistent", "literal"]
FFT_TUNING = TowerTuning("full")


@dataclass(frozen=True)
class DualLoss:
    """How Phase I's L2 (Eq. 5-6) is computed.

    Attributes:
        weight: lambda in L_Phase1 = L1 + lambda L2 (0 = L1 only: the "no negative prompt" ablation).
        eq5: ``consistent``: p_clean(c) = sigma(s cos(v, t+_c) - s cos(v, t-_c)), the negative prompt at the same
            class (the prose, the validation rule and DeFT); ``literal``: Eq. (5) as printed, the negative at the
            other label: p_clean(y) against t-_{y_hat}, p_clean(y_hat) against t-_y.
        detach_positive: the positive logits enter p_clean detached (DeFT), so L2 trains the negative prompt and
            the visual prompts only.
        detach_image: the image features enter L2 detached (DeFT); off by default: the paper's L2 regularises the
            visual prompts.
    """

    weight: float = 1.0
    eq5: Eq5 = "consistent"
    detach_positive: bool = True
    detach_image: bool = False


class DualPrompts(nn.Module):
    """Positive and negative contexts (n, W) each, ``[V_1..V_M][CLS]`` (Eq. 2-3), through one assembler."""

    def __init__(self, assembler: PromptAssembler, positive: torch.Tensor, negative: torch.Tensor) -> None:
        super().__init__()
        self.assembler = assembler
        self.positive = nn.Parameter(positive.clone())
        self.negative = nn.Parameter(negative.clone())

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> normalised text features t+ (K, D) and t- (K, D)."""
        return self.assembler.encode(self.positive), self.assembler.encode(self.negative)


@dataclass
class Encoded:
    """A Phase I model's view of every unlabelled image: features (N, D), t+ (K, D), t- (K, D), scale s."""

    feats: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    scale: float

    def logits(self) -> torch.Tensor:
        """s cos(v, t+_c) -> (N, K): the positive prompts' classification (Eq. 4's logits)."""
        return self.scale * self.feats @ self.positive.T


@dataclass
class DualPromptModel:
    """One Phase I model: ``tuned`` (a VPT copy of the base, or the base itself without VPT) + ``prompts``."""

    tuned: Backbone
    prompts: DualPrompts
    tuning: TowerTuning | None

    @torch.no_grad()
    def encode(self, task: Task, workers: int | None) -> Encoded:
        assert task.images is not None
        feats = encode_all(self.tuned, ViewDataset(task.images, [make_view("none", self.tuned)]), workers=workers)
        pos, neg = self.prompts()
        return Encoded(feats, pos.float().cpu(), neg.float().cpu(), self.tuned.logit_scale)


def _at(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, K) at labels (B,) -> (B,)."""
    return logits.gather(1, labels[:, None])[:, 0]


def dual_loss(
    feats: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    y: torch.Tensor,
    y_hat: torch.Tensor,
    scale: float,
    rule: DualLoss,
) -> torch.Tensor:
    """L1 + lambda L2 for image features (B, D), t+ / t- (K, D), pseudo-labels y (B,), complement labels
    y_hat (B,) != y."""
    l1 = F.cross_entropy(scale * feats @ pos.T, y)  # Eq. (4)
    if rule.weight == 0:
        return l1
    v = feats.detach() if rule.detach_image else feats
    lp = scale * v @ pos.T  # (B, K)
    lp = lp.detach() if rule.detach_positive else lp
    ln = scale * v @ neg.T  # (B, K)
    if rule.eq5 == "consistent":
        clean_y = _at(lp, y) - _at(ln, y)  # logit of p_clean(y): positive vs negative prompt of the same class
        clean_hat = _at(lp, y_hat) - _at(ln, y_hat)
    else:  # Eq. (5) as printed: the negative prompt at the other label
        clean_y = _at(lp, y) - _at(ln, y_hat)
        clean_hat = _at(lp, y_hat) - _at(ln, y)
    l2 = -(F.logsigmoid(clean_y) + F.logsigmoid(-clean_hat)).mean()  # Eq. (6): -log p(y) - log(1 - p(y_hat))
    return l1 + rule.weight * l2


def train_dual_prompt_model(
    base: Backbone,
    task: Task,
    selected: PseudoLabels,
    tuning: TowerTuning | None,
    n_ctx: int,
    schedule: Schedule,
    rule: DualLoss,
    generator: torch.Generator,
    hooks: TrainingHooks,
    *,
    ctx_std: float = 0.02,
    scale: float | None = None,
    augment: str = "none",
    workers: int | None = None,
) -> DualPromptModel:
    """Phase I for one model: fresh visual prompts (``tuning``; None = no VPT) and dual contexts N(0, ctx_std)
    trained on ``selected`` (+ labelled shots) with ``dual_loss``; the last epoch kept (no labels to select by)."""
    if task.images is None:
        raise VlmtuneError("CoFT trains on pixels: the runner gives Task.images (run it through the runner)")
    k = task.num_classes
    if k < 2:
        raise VlmtuneError("CoFT needs at least two classes (its negative prompt scores a complement label)")
    tuned = tunable_copy(base, tuning, generator, note=hooks.note) if tuning is not None else base
    units = token_scale(base, scale)
    assembler = PromptAssembler(tuned, task.classnames, n_ctx, "end", units)
    pos = init_context(tuned, n_ctx, None, generator, std=ctx_std, scale=units)  # (n, W)
    neg = init_context(tuned, n_ctx, None, generator, std=ctx_std, scale=units)
    device = tuned.device
    prompts = DualPrompts(assembler, pos, neg).to(device)
    draws = torch.Generator().manual_seed(draw_seed(generator))  # complement labels, redrawn every step
    logit_scale = base.logit_scale

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(tuning is not None):
            feats = tuned.encode_images(x)  # (B, D), normalised
        t_pos, t_neg = prompts()
        y_hat = (y.cpu() + torch.randint(1, k, (len(y),), generator=draws)) % k  # uniform over the other classes
        return dual_loss(feats.float(), t_pos, t_neg, y, y_hat.to(y.device), logit_scale, rule)

    data = LabelledViews(pseudo_sources(task, selected), make_view(augment, tuned))
    loader = make_loader(data, schedule.batch_size, seed=draw_seed(generator), workers=workers)
    parts: dict[str, nn.Module] = {"prompts": prompts}
    if tuning is not None:
        parts["tower"] = tuned.model
    with base.frozen():  # without VPT the text tower is the base's own: only the contexts train
        train_pixels(
            LossModule(parts, loss), loader, schedule, step=hooks.step, device=device, seed=draw_seed(generator)
        )
    return DualPromptModel(tuned, prompts, tuning)


def negative_margin(model: Encoded, labels: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """cos(v, t+(y)) - cos(v, t-(y)) of ``model`` for the images at ``index`` (all if None) labelled ``labels``
    (M,): > 0 = its negative prompt takes the label for clean. -> (M,)"""
    feats = model.feats if index is None else model.feats[index]
    return (feats * model.positive[labels]).sum(1) - (feats * model.negative[labels]).sum(1)


def collaborative_filter(
    labeller: Encoded, validator: Encoded, confidence: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec. 3.2: ``labeller`` labels every image with its positive prompts, y_i = argmax_c cos(v_i, t_i+(c));
    ``validator`` keeps an image iff cos(v_j, t_j+(y_i)) > cos(v_j, t_j-(y_i)). With ``confidence`` (the
    no-negative-prompt ablation) it keeps it iff its positive-prompt softmax gives y_i at least that probability.
    -> labels (N,), the validator's margin (N,): kept iff > 0."""
    labels = labeller.logits().argmax(1)  # (N,)
    rows = torch.arange(len(labels))
    if confidence is not None:
        return labels, validator.logits().softmax(1)[rows, labels] - confidence + 1e-12  # >= confidence kept
    return labels, negative_margin(validator, labels)


@dataclass(frozen=True)
class MoCoSettings:
    """CoFT+'s momentum contrast during FFT (Eq. 8-10): EMA momentum mu, temperature tau', loss weight gamma,
    queue size (capped at the images rounded down to the batch), projection MLP D -> D -> dim, view recipe."""

    momentum: float = 0.999
    temperature: float = 0.2
    weight: float = 1.0
    queue: int = 65536
    dim: int = 128
    augment: str = "mocov2"


def _projection(width: int, dim: int) -> nn.Sequential:
    """MoCo v2's MLP head: Linear(D, D) - ReLU - Linear(D, dim)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))


def fft_contrast_loss(logits: torch.Tensor, y: torch.Tensor, contrast: torch.Tensor, weight: float) -> torch.Tensor:
    """Eq. (10): L_FFT + gamma L_cont. L_FFT (Eq. 7) = CE of the head's ``logits`` (B, K) on the batch's clean images
    (``y`` (B,), -1 = not in the clean set); L_cont (Eq. 9) = InfoNCE on ``contrast`` (B, 1 + Q), the positive key
    in column 0 (``MoCoQueue.logits``)."""
    ce = F.cross_entropy(logits, y.clamp_min(0), reduction="none")  # (B,)
    labelled = (y >= 0).float()
    l_fft = (ce * labelled).sum() / labelled.sum().clamp_min(1)  # Eq. (7) on the clean images of the batch
    l_cont = F.cross_entropy(contrast, torch.zeros(len(contrast), dtype=torch.long, device=contrast.device))
    return l_fft + weight * l_cont  # Eq. (10)


def train_fft(
    cls: type[TowerClassifier],
    base: Backbone,
    task: Task,
    clean: PseudoLabels,
    weights: torch.Tensor,
    schedule: Schedule,
    generator: torch.Generator,
    hooks: TrainingHooks,
    *,
    augment: str = "none",
    workers: int | None = None,
    moco: MoCoSettings | None = None,
) -> TowerClassifier:
    """Full fine-tuning of a fresh copy of the pretrained image tower + an FC head f(v) = W v + b (Eq. 7) with CE on
    ``clean`` (+ labelled shots); W starts at ``weights`` (K, D) (the labeller's positive prompts), b at 0.
    ``moco``: + gamma L_cont over every unlabelled image (Eq. 9-10)."""
    if moco is None:
        empty = PseudoLabels(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
        return train_tower_round(
            cls,
            base,
            task,
            clean,
            empty,
            FFT_TUNING,
            schedule,
            generator,
            hooks,
            templates=(),
            head="linear",
            augment=augment,
            workers=workers,
            weights=weights,
        )
    assert task.images is not None
    tuned = tunable_copy(base, FFT_TUNING, generator)
    device = tuned.device
    head = TowerHead(weights, base.logit_scale, cosine=False).to(device)
    with torch.random.fork_rng(devices=[]):  # the projection's init, from the run's generator
        torch.manual_seed(draw_seed(generator))
        mlp = _projection(base.embed_dim, moco.dim).to(device)
    online = nn.ModuleDict({"model": tuned.model, "mlp": mlp})
    ema = EMAEncoder(online, moco.momentum)  # Eq. (8), over the tower and its projection
    ema.update(online)  # the first update copies the weights
    averaged = cast(nn.ModuleDict, ema.module)  # the EMA copy of ``online``
    key = copy.copy(tuned)
    key.model = averaged["model"]
    n = len(task.images)
    size = max(schedule.batch_size, min(moco.queue, n // schedule.batch_size * schedule.batch_size))
    queue = MoCoQueue(size, moco.dim, generator).to(device)

    def loss(xs: torch.Tensor, xq: torch.Tensor, xk: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q = online["mlp"](tuned.encode_images(xq))  # (B, dim)
        with torch.no_grad():
            k = averaged["mlp"](key.encode_images(xk))
        contrast = queue.logits(q.float(), k.float(), moco.temperature)  # (B, 1 + Q), Eq. (9)
        queue.push(k)
        return fft_contrast_loss(head(tuned.encode_images(xs)), y, contrast, moco.weight)

    targets = torch.full((n,), -1, dtype=torch.long)
    targets[clean.index] = clean.labels
    sources = pseudo_sources(task, PseudoLabels(torch.arange(n), targets))
    views = [make_view(augment, tuned), make_view(moco.augment, tuned), make_view(moco.augment, tuned)]
    loader = make_loader(LabelledViews(sources, views), schedule.batch_size, seed=draw_seed(generator), workers=workers)
    module = LossModule({"online": online, "head": head}, loss)
    train_pixels(
        module, loader, schedule, step=hooks.step, after_step=lambda: ema.update(online), device=device,
        seed=draw_seed(generator),
    )  # fmt: skip
    return head.to_classifier(cls, task.classnames, (), tuned, base, FFT_TUNING)
