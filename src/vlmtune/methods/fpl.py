"""IFPL and GRIP (Menghini et al., NeurIPS 2023), textual modality: iterative pseudo-labelling with CoOp prompts.

Each of 10 iterations re-initialises the prompt (16 context tokens, N(0, 0.02)), pseudo-labels every unlabelled
image with the current model (iteration 1: zero-shot CLIP) and keeps per class a leaderboard filled to K by
softmax probability (images that miss their class move to their next class; ``fill_top_k``). IFPL: K = 16 every
iteration. GRIP: K grows, int((t + 1) * N / 10 / C) in iteration t, to all of U. 20% of the pseudo-labels
validate: the best epoch on them is kept. SGD lr 0.1, momentum 0.9, weight decay 0.1, batch 16, 150 epochs,
cosine after 5 linear warm-up epochs. Trained on cached features (docs/fidelity.md).
"""

from __future__ import annotations

import torch

from vlmtune.methods._label_free import PseudoLabelClassifier, PseudoLabelPrompting, PseudoPromptConfig
from vlmtune.methods._options import method_config, option
from vlmtune.methods._pseudo import PseudoLabels, fill_top_k, grip_count
from vlmtune.methods.base import register_method


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


class IFPLClassifier(PseudoLabelClassifier):
    pass


class GRIPClassifier(PseudoLabelClassifier):
    pass


class _FPL(PseudoLabelPrompting):
    config_cls = FPLConfig
    warmup = "linear"

    def per_class(self, n: int, classes: int, round: int, rounds: int) -> int:
        return self.config.shots

    def select(self, scores: torch.Tensor, round: int, rounds: int) -> PseudoLabels:
        k = self.per_class(scores.shape[0], scores.shape[1], round, rounds)
        return fill_top_k(scores.softmax(dim=1), k)


@register_method("ifpl")
class IFPL(_FPL):
    """IFPL: iterative fixed pseudo-labelling, 16 per class filled to K, the prompt re-initialised each round."""

    classifier = IFPLClassifier
    summary = "IFPL: iterative top-16 (filled-to-K) pseudo-labels, CoOp re-initialised each iteration (label-free)"


@register_method("grip")
class GRIP(_FPL):
    """GRIP: like IFPL with a pseudo-label set that grows each iteration to the whole unlabelled set."""

    classifier = GRIPClassifier
    summary = "GRIP: iterative, growing pseudo-label sets (to all of U), CoOp re-initialised each iteration"

    def per_class(self, n: int, classes: int, round: int, rounds: int) -> int:
        return grip_count(n, classes, round, rounds)
