"""LaFTer (Mirza et al., NeurIPS 2023): label-free tuning of zero-shot classifiers with language and unlabelled images.

Stage 1, text only: a linear classifier (D -> K, no bias) learns to name the class of normalised text embeddings of
LLM-written class descriptions (``Task.texts``, the text-generation stage, or a JSON file) and of the dataset's
templates, with Gaussian noise (std 0.1) added to the embeddings: CLIP's shared space lets it classify images next.
Stage 2, FixMatch-style: the frozen stage-1 classifier on the frozen model's features of each unlabelled image (the
weak view: resize + centre crop) gives a hard pseudo-label; the student (visual prompts, VPT-shallow with 50 tokens,
the image tower's LayerNorms and the classifier) learns it from a strong view (MoCo v2's augmentation) with label
smoothing 0.1. AdamW lr 5e-4, weight decay 0.01, batch 50, 50 epochs at a constant rate; the last epoch is kept.
Reference-code details and our choices: docs/fidelity.md.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from vlmtune.backbones.base import Backbone
from vlmtune.backbones.tuning import TowerTuning
from vlmtune.capabilities import Capability
from vlmtune.methods.api import Method, Task, TrainingHooks
from vlmtune.methods.common.pseudo import PseudoLabels
from vlmtune.methods.common.text import read_descriptions
from vlmtune.methods.common.tower import TowerClassifier, TowerHead, train_tower_round
from vlmtune.methods.labelfree.base import unlabeled_of
from vlmtune.methods.labelfree.contrastive import Augment
from vlmtune.methods.options import method_config, option
from vlmtune.methods.registry import register_method
from vlmtune.schedule import Schedule, make_optimizer


@method_config
class LaFTerConfig:
    descriptions: str | None = option(
        "generate", "class descriptions of stage 1: 'generate' (the text-generation stage), a JSON file {class name: "
        "[sentences]}, or none (the dataset's templates alone)"
    )  # fmt: skip
    generated: int = option(10, "descriptions=generate: sentences per class", ge=1)
    templates: bool = option(True, "add the dataset's templates (filled with each class name) to the descriptions")
    text_steps: int = option(500, "stage 1: full-batch steps (400-600 per dataset in the reference)", ge=1)
    text_noise: float = option(0.1, "stage 1: std of the Gaussian noise on the normalised text embeddings", ge=0)
    label_smoothing: float = option(0.1, "label smoothing of both stages' cross-entropy", ge=0, lt=1)
    lr: float = option(5e-4, "AdamW learning rate (both stages)", gt=0)
    weight_decay: float = option(0.01, "AdamW weight decay (both stages)", ge=0)
    epochs: int = option(50, "stage 2 epochs", ge=1)
    batch_size: int = option(50, "stage 2 batch size", ge=1)
    tokens: int = option(50, "stage 2: visual prompt tokens (VPT-shallow)", ge=1)
    init: Literal["uniform", "randn", "normal"] = option("uniform", "visual prompt init (LaFTer: VPT's uniform)")
    layernorm: bool = option(True, "stage 2: the image tower's LayerNorms train too")
    augment: Augment = option("mocov2", "stage 2 student view (LaFTer's strong view = MoCo v2's)")
    workers: int | None = option(None, "DataLoader workers per process (none = cores - 1, <= 8; 0 on <= 2 cores)", ge=0)


class LaFTerClassifier(TowerClassifier):
    """The trained classifier (no bias, scale 1) on the prompted image tower's normalised features."""


def text_corpus(task: Task, cfg: LaFTerConfig, hooks: TrainingHooks) -> tuple[list[str], torch.Tensor]:
    """(sentences, their class (S,)): the class descriptions and / or the templates filled with each class name."""
    per_class: dict[str, list[str]] = {c: [] for c in task.classnames}
    if cfg.descriptions == "generate":
        if task.texts is None:
            hooks.note("LaFTer: no text-generation stage in this run; its text classifier learns the templates alone")
        else:
            for c, sentences in task.texts.class_descriptions(task.classnames, cfg.generated).items():
                per_class[c] += [s for s in sentences if s.strip()]
    elif cfg.descriptions is not None:
        given = read_descriptions(cfg.descriptions)
        for c in task.classnames:
            per_class[c] += given.get(c, [])
    if cfg.templates or not any(per_class.values()):
        for c in task.classnames:
            per_class[c] += [t.format(c) for t in task.templates]
    texts = [s for c in task.classnames for s in per_class[c]]
    labels = torch.tensor([i for i, c in enumerate(task.classnames) for _ in per_class[c]])
    return texts, labels


def train_text_classifier(
    feats: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: LaFTerConfig, generator: torch.Generator,
    hooks: TrainingHooks,
) -> torch.Tensor:  # fmt: skip
    """Stage 1: W (K, D) of a bias-free linear classifier on noisy normalised text features ``feats`` (S, D)."""
    x = F.normalize(feats.float(), dim=-1)
    weight = torch.nn.Parameter(torch.empty(num_classes, x.shape[1]))
    bound = x.shape[1] ** -0.5  # nn.Linear's default init
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=generator)
    schedule = Schedule(lr=cfg.lr, epochs=cfg.text_steps, weight_decay=cfg.weight_decay, warmup_epochs=0,
                        optimizer="adamw", decay="constant")  # fmt: skip
    opt = make_optimizer([weight], schedule)
    for step in range(cfg.text_steps):
        noisy = x + cfg.text_noise * torch.randn(x.shape, generator=generator)
        loss = F.cross_entropy(noisy @ weight.T, labels, label_smoothing=cfg.label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == cfg.text_steps:
            hooks.step(step + 1, cfg.text_steps, "text step", loss=loss.item())
    return weight.detach()


@register_method("lafter")
class LaFTer(Method):
    """LaFTer: a text-only classifier on LLM descriptions, then its pseudo-labels teach visual prompts."""

    config_cls = LaFTerConfig
    classifier = LaFTerClassifier
    capability = Capability.WHITE_BOX
    needs_labels = False
    default_shots = 0
    summary = "LaFTer: a classifier trained on LLM class descriptions, then FixMatch-style visual prompt tuning"
    presets: ClassVar[dict] = {"templates-only": {"descriptions": None}}

    def wants_images(self) -> bool:
        return True

    def fit(self, handle: Backbone, task: Task, *, generator: torch.Generator) -> LaFTerClassifier:
        cfg = self.config
        frozen = unlabeled_of(task, self.name).features.float().cpu()  # (N, D): the weak view, frozen model
        texts, text_labels = text_corpus(task, cfg, self.hooks)
        weight = train_text_classifier(
            handle.encode_texts(texts).detach().float().cpu(), text_labels, task.num_classes, cfg, generator,
            self.hooks,
        )  # fmt: skip
        teacher = (F.normalize(frozen, dim=-1) @ weight.T).argmax(1)  # (N,) the frozen teacher's hard labels
        everything = torch.arange(len(frozen))
        self.hooks.pseudo_labels(0, "all", everything, teacher, "text classifier")
        head = TowerHead(weight, 1.0, cosine=False, bias=False)  # the student's classifier, from the teacher's W
        schedule = Schedule(lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                            warmup_epochs=0, optimizer="adamw", decay="constant")  # fmt: skip
        none = torch.empty(0, dtype=torch.long)
        return train_tower_round(  # type: ignore[return-value]
            self.classifier, handle, task, PseudoLabels(everything, teacher), PseudoLabels(none, none),
            TowerTuning("vpt-shallow", cfg.tokens, cfg.init, layernorm=cfg.layernorm), schedule, generator,
            self.hooks, templates=(), head=head, augment=cfg.augment, workers=cfg.workers,
            label_smoothing=cfg.label_smoothing,
        )  # fmt: skip
