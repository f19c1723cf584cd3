"""The loop IFPL and GRIP share (Menghini et al., NeurIPS 2023): iterative pseudo-labelling with CoOp prompts.

Each of 10 iterations re-initialises the prompt (16 context tokens, N(0, 0.02)), pseudo-labels every unlabelled
image with the current model (iteration 1: zero-shot CLIP) and keeps per class a leaderboard filled to K by
softmax probability (images that miss their class move to their next class; ``fill_top_k``). IFPL: K = 16 every
iteration. GRIP: K grows, int((t + 1) * N / 10 / C) in iteration t, to all of U. 20% of the pseudo-labels
validate: the best epoch on them is kept. SGD lr 0.1, momentum 0.9, weight decay 0.1, batch 16, 150 epochs,
cosine after 5 linear warm-up epochs. Trained on cached features (docs/fidelity.md).

``modality=visual``: the same loop with visual prompts instead (Menghini et al.'s visual modality: VPT-shallow, 16
tokens, N(0, 1) / sqrt(width)) trained on the pseudo-labelled images' pixels against the fixed class text
features of the template; every iteration relabels U through the tuned tower. ``visual_tuning`` swaps VPT for
deep VPT, LayerNorm-only or full tuning of the image tower.
"""

from __future__ import annotations

from typing import Literal

import torch

from vlmtune.backbones.base import Backbone
from vlmtune.backbones.tuning import TowerTuning
from vlmtune.features.extract import FeatureSet
from vlmtune.methods.api import Classifier, Task
from vlmtune.methods.common.pseudo import PseudoLabels, fill_top_k, split_validation
from vlmtune.methods.common.tower import TowerClassifier, train_tower_round
from vlmtune.methods.labelfree.base import (
    PseudoLabelClassifier,
    PseudoLabelPrompting,
    PseudoPromptConfig,
    pseudo_templates,
)
from vlmtune.methods.options import method_config, option


@method_config
class FPLConfig(PseudoPromptConfig):
    shots: int = option(16, "IFPL: pseudo-labels per class in every iteration (GRIP grows its own count)", ge=1)
    iterations: int = option(10, "re-labelling iterations (100 / STEP_QUANTILE)", ge=1)
    validation: float = option(0.2, "share of the pseudo-labels held out to pick the best epoch", ge=0, lt=1)
    lr: float = option(0.1, "SGD learning rate", gt=0)
    epochs: int = option(150, "epochs per iteration", ge=1)
    batch_size: int = option(16, "images per step", ge=1)
    weight_decay: float = option(0.1, "SGD weight decay", ge=0)
    warmup_epochs: int = option(5, "linear warm-up epochs", ge=0)
    modality: Literal["textual", "visual"] = option(
        "textual", "textual: CoOp prompt on cached features; visual: image-tower tuning on pixels, text fixed"
    )
    visual_tuning: Literal["vpt-shallow", "vpt-deep", "layernorm", "full"] = option(
        "vpt-shallow", "visual modality: what of the image tower trains"
    )
    visual_head: Literal["text", "linear"] = option(
        "text", "visual modality: fixed class text features, or a linear head initialised from them and trained"
    )
    visual_tokens: int = option(16, "visual modality: prompt tokens per layer (VPT)", ge=1)
    visual_init: Literal["randn", "uniform", "normal"] = option(
        "randn", "VPT init: N(0,1)/sqrt(width) (Menghini), VPT's uniform, or N(0, 0.02)"
    )
    augment: Literal["none", "flip-crop", "mocov2", "latteclip", "fixmatch-weak", "fixmatch-strong"] = option(
        "none", "visual modality: augmentation of the training views (vlmtune.pixels.augment)"
    )
    workers: int | None = option(
        None, "visual modality: DataLoader workers per process (none = cores - 1, <= 8; 0 on <= 2 cores)", ge=0
    )


class FixedPseudoLabelling(PseudoLabelPrompting):
    """What IFPL and GRIP share: iterations of pseudo-labels filled to K per class, textual or visual prompts."""

    config_cls = FPLConfig
    classifier = PseudoLabelClassifier
    extra_classifiers = (TowerClassifier,)  # modality=visual
    warmup = "linear"

    def wants_images(self) -> bool:
        return self.config.modality == "visual"

    def train_round(
        self,
        handle: Backbone,
        task: Task,
        feats: torch.Tensor,
        pseudo: PseudoLabels,
        labelled: FeatureSet | None,
        generator: torch.Generator,
    ) -> Classifier:
        if self.config.modality == "textual":
            return super().train_round(handle, task, feats, pseudo, labelled, generator)
        cfg = self.config
        train, val = split_validation(pseudo, self.validation_fraction(), generator)
        tuning = TowerTuning(cfg.visual_tuning, cfg.visual_tokens, cfg.visual_init)
        templates = pseudo_templates(task, cfg.template)
        return train_tower_round(
            TowerClassifier,
            handle,
            task,
            train,
            val,
            tuning,
            self.schedule(),
            generator,
            self.hooks,
            templates=templates,
            head=cfg.visual_head,
            augment=cfg.augment,
            workers=cfg.workers,
        )

    def per_class(self, n: int, classes: int, round: int, rounds: int) -> int:
        return self.config.shots

    def select(self, scores: torch.Tensor, round: int, rounds: int) -> PseudoLabels:
        k = self.per_class(scores.shape[0], scores.shape[1], round, rounds)
        return fill_top_k(scores.softmax(dim=1), k)
