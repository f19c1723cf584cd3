"""The classifier shared by the prompt learners: learned context (+ a conditioning module) behind a bound backbone.

A ``PromptClassifier`` is both what the method trains (its parameters are the context and the module) and what it
returns: training and inference go through the same ``forward_logits``. Its text tower is the backbone's, bound at
fit time or after loading (``bind``); the saved artifact holds only the learned tensors and settings.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import Self

from vlmtune.backbones.base import Backbone
from vlmtune.capabilities import Capability
from vlmtune.features.extract import FeatureSet
from vlmtune.methods.api import Classifier, Method, Task, TrainingHooks
from vlmtune.methods.common.prompt import (
    TOKEN_SCALE_DOC,
    Position,
    PromptAssembler,
    Schedule,
    coop_epochs,
    init_context,
    token_scale,
    train_sgd_cosine,
)
from vlmtune.methods.options import method_config, option


@method_config
class ImagePromptConfig:
    """The options of the prompt learners whose prompts depend on the image (CoCoOp, TMM), at their papers' defaults."""

    n_ctx: int = option(4, "context vectors", ge=1)
    ctx_init: str | None = option("a photo of a", "initial words (n_ctx must equal their token count); none = random")
    position: Position = option("end", "class token position")
    lr: float = option(0.002, "SGD learning rate at batch 1 (CLIP's token-embedding scale)", gt=0)
    epochs: int | None = option(10, "epochs; none = by shots", ge=1)
    batch_size: int = option(1, "images per step (the papers' 1; all B x K prompts in one text-tower pass)", ge=1)
    scale_lr: bool = option(True, "batch_size > 1: lr x batch_size (linear scaling rule)")
    token_scale: float | None = option(None, TOKEN_SCALE_DOC, gt=0)


class PromptClassifier(Classifier):
    """Context vectors ``ctx`` (n, W) or class-specific (K, n, W), an optional ``head`` module, and settings.

    Subclasses define ``build_head(settings)`` (the module for the saved settings) and ``forward_logits``.
    """

    needs_patches: ClassVar[bool] = False
    eval_batch: ClassVar[int] = 64  # images per inference pass
    # Image-conditioned prompts (CoCoOp, TMM) send B x K sequences through the text tower per pass: at K = 1,000,
    # 64 images would be 64,000 sequences (15-25 GB at ViT-B/16). ``eval_prompts`` bounds a pass instead: 4,096
    # sequences of 77 tokens at width 512 are ~650 MB per activation in fp32, a few GB at peak. Same logits.
    prompts_per_image: ClassVar[bool] = False
    eval_prompts: ClassVar[int] = 4096

    def __init__(
        self, classnames: Sequence[str], ctx: torch.Tensor, settings: dict[str, Any], head: nn.Module | None = None
    ) -> None:
        super().__init__(classnames)
        self.ctx = nn.Parameter(ctx.clone())
        self.settings = dict(settings)
        self.head = head if head is not None else self.build_head(self.settings)
        self._backbone: Backbone | None = None
        self._assembler: PromptAssembler | None = None
        self._text_cache: tuple[tuple[int, ...], torch.Tensor] | None = None

    # ---- wiring ----------------------------------------------------------------------------------------
    @classmethod
    def build_head(cls, settings: dict[str, Any]) -> nn.Module | None:
        return None

    def bind(self, backbone: Backbone) -> Self:
        if self._backbone is backbone:
            return self  # already wired: keep the assembler and the cached text features
        self._backbone = backbone
        scale = self.settings.get("token_scale", 1.0)
        self._assembler = PromptAssembler(
            backbone, self.classnames, self.settings["n_ctx"], self.settings["position"], scale
        )
        self.to(backbone.device)
        return self

    @property
    def assembler(self) -> PromptAssembler:
        if self._assembler is None:
            raise RuntimeError(f"{self.method}: bind(backbone) first (prompts go through the backbone's text tower)")
        return self._assembler

    @property
    def scale(self) -> float:
        return float(self.settings["scale"])

    def encode_context(self) -> torch.Tensor:
        """G(p_i) of the learned (unconditioned) prompts -> (K, D), differentiable in the context."""
        return self.assembler.encode(self.ctx)

    def text_features(self) -> torch.Tensor:
        """``encode_context()``, cached at inference."""
        if torch.is_grad_enabled():
            return self.encode_context()
        version = (self.ctx._version, id(self._assembler))
        if self._text_cache is None or self._text_cache[0] != version:
            self._text_cache = (version, self.encode_context())
        return self._text_cache[1]

    # ---- prediction ------------------------------------------------------------------------------------
    def forward_logits(self, features: torch.Tensor, patches: torch.Tensor | None) -> torch.Tensor:
        """Image features (B, D) [+ patch features (B, P, D)] -> logits (B, K). CoOp: s * cos(f, G(p_i))."""
        return self.scale * F.normalize(features, dim=-1) @ self.text_features().T

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if self.needs_patches:
            raise TypeError(f"{self.method} needs patch features: use score(FeatureSet) or predict_images")
        return self._batched(features, None)

    def images_per_pass(self) -> int:
        """Images scored per inference pass: ``eval_batch``, fewer when each image has its own K prompts."""
        if not self.prompts_per_image:
            return self.eval_batch
        return max(1, min(self.eval_batch, self.eval_prompts // len(self.classnames)))

    def _batched(self, features: torch.Tensor, patches: torch.Tensor | None) -> torch.Tensor:
        device = self.ctx.device
        step = self.images_per_pass()
        out = []
        with torch.no_grad():
            for i in range(0, len(features), step):
                p = patches[i : i + step].to(device).float() if patches is not None else None  # (B, P, D)
                out.append(self.forward_logits(features[i : i + step].to(device).float(), p).cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.classnames))

    def score(self, data: FeatureSet) -> torch.Tensor:
        if self.needs_patches and data.patches is None:
            raise ValueError(f"{self.method} needs patch features (extract with patches=True)")
        return self._batched(data.features, data.patches if self.needs_patches else None)

    def predict_images(self, backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
        self.bind(backbone)
        with torch.no_grad():
            pooled, patches = backbone.encode_image_tokens(images)
        return self._batched(pooled, patches if self.needs_patches else None)

    def for_classnames(self, classnames: Sequence[str], backbone: Backbone) -> PromptClassifier:
        if self.settings.get("csc"):
            raise NotImplementedError("class-specific context cannot describe classes it was not trained on")
        clf = type(self)(classnames, self.ctx.detach(), self.settings, copy.deepcopy(self.head))
        return clf.bind(backbone)

    # ---- artifact ---------------------------------------------------------------------------------------
    def extra_meta(self) -> dict[str, Any]:
        return {"settings": self.settings}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> PromptClassifier:
        clf = cls(meta["classnames"], tensors["ctx"], meta["settings"])
        clf.load_state_dict(tensors)
        return clf


def prompt_settings(backbone: Backbone, n_ctx: int, position: str, scale: float | None) -> dict[str, Any]:
    """The saved settings every prompt classifier has: context size and position, the backbone's widths and the
    token scale (``scale`` None = measured, see ``token_scale``)."""
    return {
        "n_ctx": n_ctx,
        "position": position,
        "embed_dim": backbone.embed_dim,
        "width": backbone.token_width,
        "token_scale": token_scale(backbone, scale),
    }


def new_prompt_classifier(
    cls: type[PromptClassifier],
    backbone: Backbone,
    classnames: Sequence[str],
    settings: dict[str, Any],
    ctx_init: str | None,
    generator: torch.Generator,
) -> PromptClassifier:
    """``cls`` at its initial state: context by CoOp's rule, head by torch's default init from ``generator``.
    ``settings["token_scale"]`` (see ``token_scale``) puts the context in CLIP's units."""
    classes = len(classnames) if settings.get("csc") else 0
    ctx = init_context(backbone, settings["n_ctx"], ctx_init, generator, classes, scale=settings["token_scale"])
    settings = {**settings, "scale": backbone.logit_scale}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        head = cls.build_head(settings)  # default init, drawn from a seed of the run's generator
    return cls(classnames, ctx, settings, head).bind(backbone)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CPL's "cc" loss: -log sum_j p_j * y_j for soft candidate targets y (B, K) that sum to 1."""
    return -(logits.softmax(dim=-1) * targets).sum(dim=-1).clamp_min(1e-12).log().mean()


def train_prompt_classifier(
    clf: PromptClassifier,
    backbone: Backbone,
    train: FeatureSet,
    schedule: Schedule,
    generator: torch.Generator,
    hooks: TrainingHooks | None = None,
    targets: torch.Tensor | None = None,
    on_epoch: Callable[[int], dict[str, float] | None] | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> PromptClassifier:
    """Train ``clf`` on ``train``'s features with cross-entropy on its labels (or the soft-target loss on
    ``targets`` (N, K), or a method's own ``loss(features (B, D), labels (B,))``, e.g. ProDA's surrogate) under
    ``schedule``; the backbone stays frozen."""
    if len(train) == 0:
        raise ValueError(f"{clf.method} needs training features")
    if clf.needs_patches and train.patches is None:
        raise ValueError(f"{clf.method} needs patch features of the training images")
    device = backbone.device
    feats, labels = train.features.to(device).float(), train.labels.to(device)
    patches = train.patches.to(device).float() if clf.needs_patches and train.patches is not None else None
    soft = targets.to(device).float() if targets is not None else None

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        if loss is not None:
            return loss(feats[idx], labels[idx])
        logits = clf.forward_logits(feats[idx], patches[idx] if patches is not None else None)
        return soft_cross_entropy(logits, soft[idx]) if soft is not None else F.cross_entropy(logits, labels[idx])

    clf.train()
    with backbone.frozen():
        train_sgd_cosine(list(clf.parameters()), loss_fn, len(labels), schedule, generator, hooks, on_epoch)
    clf.eval()
    return clf


def fit_prompt_classifier(
    cls: type[PromptClassifier],
    backbone: Backbone,
    task: Task,
    settings: dict[str, Any],
    ctx_init: str | None,
    schedule: Schedule,
    generator: torch.Generator,
    hooks: TrainingHooks | None = None,
) -> PromptClassifier:
    """A new ``cls`` trained with cross-entropy on the task's labelled training features."""
    train = task.train
    if not isinstance(train, FeatureSet) or len(train) == 0:
        raise ValueError("prompt learning needs labelled training features")
    clf = new_prompt_classifier(cls, backbone, task.classnames, settings, ctx_init, generator)
    return train_prompt_classifier(clf, backbone, train, schedule, generator, hooks)


def schedule_for(cfg: Any, task: Task, paper_batch: int) -> Schedule:
    """The config's SGD schedule; ``epochs=None`` picks CoOp's epochs by shots. With ``scale_lr`` the rate is
    the paper's at its batch size and follows the linear scaling rule (Goyal et al., 2017) at other sizes."""
    train = task.train
    shots = max(1, len(train) // max(1, task.num_classes)) if train is not None else 1
    lr = cfg.lr * cfg.batch_size / paper_batch if cfg.scale_lr else cfg.lr
    return Schedule(lr=lr, epochs=cfg.epochs or coop_epochs(shots), batch_size=cfg.batch_size)


class PromptMethod(Method):
    """The fit shared by CoOp, CoCoOp and TMM: settings from the config, then ``fit_prompt_classifier``.

    Configs have ``n_ctx``, ``ctx_init``, ``position``, ``lr``, ``epochs``, ``batch_size`` and ``scale_lr``;
    subclasses set ``paper_batch`` (the batch size ``lr`` belongs to) and add their own saved settings in
    ``extra_settings``.
    """

    capability = Capability.WHITE_BOX
    supports_new_classes = True
    paper_batch: ClassVar[int] = 1

    def extra_settings(self) -> dict[str, Any]:
        return {}

    def fit(self, handle: Backbone, task: Task, *, generator: torch.Generator) -> PromptClassifier:
        cfg = self.config
        settings = prompt_settings(handle, cfg.n_ctx, cfg.position, cfg.token_scale) | self.extra_settings()
        cls = self.classifier
        assert issubclass(cls, PromptClassifier)
        schedule = schedule_for(cfg, task, self.paper_batch)
        return fit_prompt_classifier(cls, handle, task, settings, cfg.ctx_init, schedule, generator, self.hooks)
