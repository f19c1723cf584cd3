"""CoFT and CoFT+ (Wang et al., "Fine-tuning Pre-trained Vision-Language Models in a Human-Annotation-Free Manner").

CoFT: zero-shot pseudo-labels (Eq. 1), the top-K per class by confidence as S* (|S*| = C K); Phase I trains two
models (different initialisation and data order), each with deep VPT and dual text contexts, positive and negative
(Eq. 2-3), on S* with L1 + lambda L2 (Eq. 4-6); Phase II labels every unlabelled image with model i's positive
prompts and keeps it iff model j's positive prompt beats its negative prompt at that label (both directions), then
fully fine-tunes the pretrained image tower with an FC head (Eq. 7) on each clean set; the prediction averages the
two fine-tuned models' probabilities. CoFT+: R rounds of Phase I, each from the pretrained model on the top-K
re-selected by the previous round's model (one set per model); momentum contrast over all images during the
fine-tuning (Eq. 8-10); LLM-written templates (or sentences per class) for the initial zero-shot step, from
the text-generation stage (``Task.texts``).

No public code exists: the defaults not in the paper come from DeFT, its dual-prompt ancestor
(docs/methods/coft.md, docs/fidelity.md). The runner measures every pseudo-label set it reports: S*, each model's
labels of all images, each clean set.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from vlmtune.backbones.base import Backbone
from vlmtune.backbones.tuning import TowerTuning
from vlmtune.capabilities import Capability
from vlmtune.errors import VlmtuneError
from vlmtune.methods.api import Classifier, Method, Task
from vlmtune.methods.common.prompt import TOKEN_SCALE_DOC
from vlmtune.methods.common.pseudo import PseudoLabels, top_k_per_class
from vlmtune.methods.common.text import class_description_weights, class_text_weights, read_descriptions
from vlmtune.methods.common.tower import TowerClassifier, TowerEnsemble, TowerHead
from vlmtune.methods.labelfree.base import PSEUDO_TEMPLATE_DOC, pseudo_templates, unlabeled_of
from vlmtune.methods.labelfree.coft.phases import (
    DualLoss,
    DualPromptModel,
    Encoded,
    MoCoSettings,
    collaborative_filter,
    negative_margin,
    train_dual_prompt_model,
    train_fft,
)
from vlmtune.methods.options import method_config, option
from vlmtune.methods.registry import register_method
from vlmtune.schedule import Schedule

Augment = Literal["none", "flip-crop", "mocov2", "latteclip", "fixmatch-weak", "fixmatch-strong"]


@method_config
class CoFTConfig:
    template: str = option("dataset", PSEUDO_TEMPLATE_DOC)
    shots: int = option(16, "K: top-confidence pseudo-labels per class in S* (Eq. 1)", ge=1)
    n_ctx: int = option(16, "M: context tokens of each of the positive and negative prompts (DeFT)", ge=1)
    ctx_std: float = option(0.02, "contexts' init N(0, std) (DeFT)", gt=0)
    token_scale: float | None = option(None, TOKEN_SCALE_DOC, gt=0)
    vpt: Literal["vpt-deep", "vpt-shallow", "none"] = option(
        "vpt-deep", "visual prompts of Phase I (DeFT: deep; 'none' = the no-VPT ablation)"
    )
    vpt_tokens: int = option(20, "visual prompt tokens per layer (DeFT)", ge=1)
    vpt_init: Literal["uniform", "randn", "normal"] = option("uniform", "VPT init (DeFT / VPT: uniform)")
    lam: float = option(1.0, "lambda: weight of L2 in L1 + lambda L2 (DeFT sums them)", ge=0)
    eq5: Literal["consistent", "literal"] = option(
        "consistent", "p_clean with the negative prompt of the same class, or Eq. (5) as printed (other label)"
    )
    detach_positive: bool = option(True, "positive logits detached in p_clean (DeFT)")
    detach_image: bool = option(False, "image features detached in L2 (DeFT; the paper's L2 trains the VPT)")
    negative: bool = option(True, "dual prompts; false = the ablation: L2 off, the filter by confidence")
    filter_confidence: float = option(0.5, "negative=false: keep an image if the validator gives its label this", gt=0)
    models: int = option(2, "Phase I models: 2 (collaborative), 1 (the self-validation ablation)", ge=1, le=2)
    phase2: bool = option(True, "Phase II (filter + full fine-tuning); false = the PEFT-only ablation")
    final: Literal["average", "first"] = option("average", "prediction: both fine-tuned models' mean probability")
    peft_lr: float = option(0.03, "Phase I SGD learning rate (DeFT)", gt=0)
    peft_epochs: int = option(50, "Phase I epochs on S* (CoOp / UPL)", ge=1)
    peft_batch: int = option(64, "Phase I batch size (DeFT)", ge=1)
    peft_weight_decay: float = option(5e-4, "Phase I weight decay (DeFT)", ge=0)
    fft_lr: float = option(5e-4, "Phase II SGD learning rate (DeFT)", gt=0)
    fft_epochs: int = option(10, "Phase II epochs (DeFT)", ge=1)
    fft_batch: int = option(64, "Phase II batch size (DeFT)", ge=1)
    fft_weight_decay: float = option(5e-4, "Phase II weight decay (DeFT)", ge=0)
    augment: Augment = option("none", "training views of both phases (vlmtune.pixels.augment; DeFT: flip-crop)")
    workers: int | None = option(None, "DataLoader workers per process (none = cores - 1, <= 8; 0 on <= 2 cores)", ge=0)


@method_config
class CoFTPlusConfig(CoFTConfig):
    template: str = option("ensemble", PSEUDO_TEMPLATE_DOC + "; used with descriptions=none")
    descriptions: str | None = option(
        "generate",
        "LLM-written text of the initial zero-shot step: 'generate' (templates with a class slot from the "
        "text-generation stage, the paper's), 'generate-classes' (sentences per class), a JSON file {class name: "
        "[sentences]}, or none (the template option)",
    )
    generated: int = option(8, "descriptions=generate*: templates to write, or sentences per class", ge=1)
    rounds: int = option(3, "R: rounds of Phase I, each from the pretrained model on re-selected top-K sets", ge=1)
    moco: bool = option(True, "momentum contrast over all images during the full fine-tuning (Eq. 8-10)")
    moco_momentum: float = option(0.999, "mu: EMA momentum of the key encoder (MoCo)", ge=0, lt=1)
    moco_temperature: float = option(0.2, "tau': contrastive temperature (MoCo v2)", gt=0)
    moco_weight: float = option(1.0, "gamma: weight of L_cont", ge=0)
    moco_queue: int = option(65536, "queue size (capped at the images, rounded down to the batch)", ge=1)
    moco_dim: int = option(128, "projection output of the MLP head D -> D -> dim (MoCo v2)", ge=1)
    moco_augment: Augment = option("mocov2", "views of the contrastive pair (MoCo v2's aug-plus)")


class CoFTTower(TowerClassifier):
    """One tuned tower of CoFT (a fine-tuned tower + FC head, or a Phase I model's VPT + positive prompts)."""


class CoFTClassifier(TowerEnsemble):
    member_cls = CoFTTower


class CoFTPlusClassifier(TowerEnsemble):
    member_cls = TowerClassifier


ABLATIONS: dict[str, dict[str, Any]] = {
    "no-negative": {"negative": False},
    "one-model": {"models": 1},
    "peft-only": {"phase2": False},
    "no-vpt": {"vpt": "none"},
}
# Settings for the toy world, never defaults (docs/methods/coft.md, "Diagnosis"): DeFT's Phase I step of 0.03 does
# not converge with visual prompts in the 4-layer toy ViT (Phase I loss 1.38 at the end vs 0.16 at 0.003).
TOY_PRESETS: dict[str, dict[str, Any]] = {"toy": {"peft_lr": 0.003}}


@register_method("coft")
class CoFT(Method):
    """CoFT: dual-prompt, dual-model collaborative pseudo-labelling, then full fine-tuning on the clean sets."""

    config_cls = CoFTConfig
    classifier: ClassVar[type[TowerEnsemble]] = CoFTClassifier  # narrower than Method's
    extra_classifiers: ClassVar[tuple[type[Classifier], ...]] = (CoFTTower,)
    capability = Capability.WHITE_BOX
    needs_labels = False
    default_shots = 0
    summary = "CoFT: two dual-prompt (+ VPT) models filter each other's pseudo-labels, then full fine-tuning"
    presets: ClassVar[dict[str, dict[str, Any]]] = {**ABLATIONS, **TOY_PRESETS}
    supports_student = True  # distillation: Phase I on the teacher (the handle), Phase II fine-tunes the student

    def wants_images(self) -> bool:
        return True

    # ---- what CoFT+ changes ----------------------------------------------------------------------------
    def rounds(self) -> int:
        return 1

    def initial_weights(self, handle: Backbone, task: Task) -> torch.Tensor:
        """Class text features (K, D) of the initial zero-shot step (Eq. 1)."""
        return class_text_weights(handle, task.classnames, pseudo_templates(task, self.config.template))

    def moco(self) -> MoCoSettings | None:
        return None

    # ---- the shared pipeline -----------------------------------------------------------------------------
    def schedules(self) -> tuple[Schedule, Schedule]:
        cfg = self.config
        peft = Schedule(
            cfg.peft_lr, cfg.peft_epochs, cfg.peft_batch, weight_decay=cfg.peft_weight_decay, warmup_epochs=0
        )
        fft = Schedule(cfg.fft_lr, cfg.fft_epochs, cfg.fft_batch, weight_decay=cfg.fft_weight_decay, warmup_epochs=0)
        return peft, fft

    def fit(self, handle: Backbone, task: Task, *, generator: torch.Generator) -> TowerEnsemble:
        cfg = self.config
        if cfg.vpt == "none" and not cfg.phase2:
            raise VlmtuneError(f"{self.name}: vpt=none with phase2=false trains nothing but text contexts (use coop)")
        if task.student is not None and not cfg.phase2:
            raise VlmtuneError(f"{self.name}: distillation fine-tunes the student in Phase II (phase2=false has none)")
        feats = unlabeled_of(task, self.name).features.float()  # (N, D)
        everything = torch.arange(len(feats))
        scores = handle.logit_scale * feats @ self.initial_weights(handle, task).T  # Eq. (1), (N, K)
        self.hooks.pseudo_labels(0, "all", everything, scores.argmax(1))
        selected = [top_k_per_class(scores.softmax(1), cfg.shots)] * cfg.models  # S*: |S*| <= C K
        peft, fft = self.schedules()
        tuning = None if cfg.vpt == "none" else TowerTuning(cfg.vpt, cfg.vpt_tokens, cfg.vpt_init)
        rule = DualLoss(cfg.lam if cfg.negative else 0.0, cfg.eq5, cfg.detach_positive, cfg.detach_image)
        models: list[DualPromptModel] = []
        encoded: list[Encoded] = []
        for r in range(self.rounds()):
            models, encoded = [], []
            for m, chosen in enumerate(selected):
                if len(chosen) == 0:
                    raise VlmtuneError(f"{self.name}: no image was selected for pseudo-labelling (round {r + 1})")
                self.hooks.pseudo_labels(r + 1, "selected", chosen.index, chosen.labels, f"model {m + 1}")
                model = train_dual_prompt_model(
                    handle,
                    task,
                    chosen,
                    tuning,
                    cfg.n_ctx,
                    peft,
                    rule,
                    generator,
                    self.hooks,
                    ctx_std=cfg.ctx_std,
                    scale=cfg.token_scale,
                    augment=cfg.augment,
                    workers=cfg.workers,
                )
                models.append(model)
                encoded.append(model.encode(task, cfg.workers))
                self.hooks.pseudo_labels(r + 1, "all", everything, encoded[-1].logits().argmax(1), f"model {m + 1}")
                if cfg.negative:  # does its negative prompt tell the right labels of its own training set?
                    margin = negative_margin(encoded[-1], chosen.labels, chosen.index)
                    self.hooks.pseudo_labels(
                        r + 1, "filter", chosen.index, chosen.labels, f"model {m + 1} on S*", margin
                    )
            trained_on = selected
            # CoFT+: each model's own top-K for the next round, from this round's model
            selected = [top_k_per_class(e.logits().softmax(1), cfg.shots) for e in encoded]
        last = self.rounds()
        if not cfg.phase2:
            return self._peft_classifier(handle, task, models, encoded)
        student = task.student or handle  # distillation: the teacher's clean sets fine-tune the student
        # W starts at the labeller's positive prompts; a student (another embedding space) at its own zero-shot
        student_weights = self.initial_weights(student, task) if task.student is not None else None
        members = []
        for i in range(len(encoded) if cfg.final == "average" else 1):
            validator = encoded[(i + 1) % len(encoded)]  # the other model (itself with models=1)
            confidence = None if cfg.negative else cfg.filter_confidence
            labels, margin = collaborative_filter(encoded[i], validator, confidence)
            keep = margin > 0
            clean = PseudoLabels(everything[keep], labels[keep])
            judge = f"model {i + 1}, judged by model {(i + 1) % len(encoded) + 1}"
            self.hooks.pseudo_labels(last, "filter", everything, labels, judge, margin)
            self.hooks.pseudo_labels(last, "clean", clean.index, clean.labels, f"model {i + 1}")
            if len(clean) == 0:
                self.hooks.note(
                    f"{self.name}: the filter kept none of model {i + 1}'s labels (a Phase I too short for the "
                    "negative prompt?); its fine-tuning uses the set its Phase I trained on (S*) instead"
                )
                clean = trained_on[i]
            weights = encoded[i].positive if student_weights is None else student_weights
            members.append(
                train_fft(
                    self.classifier.member_cls,
                    student,
                    task,
                    clean,
                    weights,
                    fft,
                    generator,
                    self.hooks,
                    augment=cfg.augment,
                    workers=cfg.workers,
                    moco=self.moco(),
                )
            )
        return self.classifier(task.classnames, members)

    def _peft_classifier(
        self, handle: Backbone, task: Task, models: list[DualPromptModel], encoded: list[Encoded]
    ) -> TowerEnsemble:
        """The PEFT-only ablation: each Phase I model's VPT tower with its positive prompts' text features."""
        members = []
        for model, enc in zip(models, encoded, strict=True):
            assert model.tuning is not None
            head = TowerHead(enc.positive, handle.logit_scale, cosine=True)
            members.append(
                head.to_classifier(self.classifier.member_cls, task.classnames, (), model.tuned, handle, model.tuning)
            )
        return self.classifier(task.classnames, members)


@register_method("coft_plus")
class CoFTPlus(CoFT):
    """CoFT+: R re-initialised Phase I rounds on re-selected top-K sets, MoCo during FFT, descriptive prompts."""

    config_cls = CoFTPlusConfig
    classifier = CoFTPlusClassifier
    extra_classifiers = (TowerClassifier,)
    summary = "CoFT+: CoFT with R Phase I rounds, momentum contrast in the fine-tuning and LLM-written prompts"

    def rounds(self) -> int:
        return self.config.rounds

    def initial_weights(self, handle: Backbone, task: Task) -> torch.Tensor:
        source, n = self.config.descriptions, self.config.generated
        if source is None:
            return super().initial_weights(handle, task)
        if source not in ("generate", "generate-classes"):
            return class_description_weights(handle, task.classnames, read_descriptions(source))
        if task.texts is None:
            self.hooks.note("CoFT+: no text-generation stage in this run; pseudo-labels from the templates")
            return super().initial_weights(handle, task)
        if source == "generate-classes":
            return class_description_weights(handle, task.classnames, task.texts.class_descriptions(task.classnames, n))
        templates = task.texts.templates(n)
        if not templates:
            self.hooks.note("CoFT+: the generator wrote no template with a {} slot; pseudo-labels from the templates")
            return super().initial_weights(handle, task)
        self.hooks.note(f"CoFT+: initial pseudo-labels from {len(templates)} generated templates: {templates}")
        return class_text_weights(handle, task.classnames, templates)

    def moco(self) -> MoCoSettings | None:
        cfg = self.config
        if not cfg.moco:
            return None
        return MoCoSettings(
            cfg.moco_momentum, cfg.moco_temperature, cfg.moco_weight, cfg.moco_queue, cfg.moco_dim, cfg.moco_augment
        )
