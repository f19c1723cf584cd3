"""CPL: candidate pseudo-label learning (Zhang et al., ICML 2024), textual prompts, label-free.

Each image gets a candidate set of classes: the intersection of an intra-instance rule (its most probable classes
until their cumulative probability exceeds tau, the alpha-quantile of the max probability over U) and an
inter-instance rule (classes c for which its p_c reaches the beta-quantile of column c). Per class a pool of the
most confident candidates is filled (each image once, ``fill_top_k`` restricted to its candidates) and grows
GRIP-style over the iterations; the selected images train a re-initialised CoOp prompt with the "cc" loss
-log sum_j p_j y_j on their renormalised candidate probabilities. SGD lr 0.02, weight decay 0.05, batch 64,
50 epochs, cosine after 2 linear warm-up epochs, 16 context tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vlmtune.methods.common.pseudo import PseudoLabels, candidate_sets, candidate_targets, fill_top_k, grip_count
from vlmtune.methods.labelfree.base import PseudoLabelClassifier, PseudoLabelPrompting, PseudoPromptConfig
from vlmtune.methods.options import method_config, option
from vlmtune.methods.registry import register_method

# alpha x 100 / beta of the reference code's unsupervised configs, by dataset
DATASET_PRESETS = {
    "eurosat": (75, 0.80),
    "flowers102": (60, 0.99),
    "fgvc_aircraft": (90, 0.97),
    "dtd": (75, 0.95),
    "cub": (75, 0.99),
    "resisc45": (90, 0.97),
}


@method_config
class CPLConfig(PseudoPromptConfig):
    alpha: float = option(0.75, "intra-instance: tau = this quantile of the max probability over U", ge=0, le=1)
    beta: float = option(0.95, "inter-instance: keep p_c >= this quantile of column c", ge=0, le=1)
    iterations: int = option(10, "re-labelling iterations; the pools grow GRIP-style", ge=1)
    max_per_class: int | None = option(None, "cap of a class's pool; none = GRIP's growth to N / C", ge=1)
    validation: float = option(0.0, "share of the selected images held out to pick the best epoch", ge=0, lt=1)
    lr: float = option(0.02, "SGD learning rate", gt=0)
    epochs: int = option(50, "epochs per iteration", ge=1)
    batch_size: int = option(64, "images per step", ge=1)
    weight_decay: float = option(0.05, "SGD weight decay", ge=0)
    warmup_epochs: int = option(2, "linear warm-up epochs", ge=0)


@register_method("cpl")
class CPL(PseudoLabelPrompting):
    """CPL: candidate pseudo-label sets (intra- and inter-instance), soft targets, the "cc" loss."""

    config_cls = CPLConfig
    classifier = PseudoLabelClassifier
    warmup = "linear"
    summary = "CPL: candidate pseudo-label sets with intra/inter-instance thresholds and the cc loss (label-free)"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        name: {"alpha": a / 100, "beta": b} for name, (a, b) in DATASET_PRESETS.items()
    }

    def select(self, scores: torch.Tensor, round: int, rounds: int) -> PseudoLabels:
        probs = scores.softmax(dim=1)  # (N, K)
        candidates = candidate_sets(probs, self.config.alpha, self.config.beta)
        k = grip_count(probs.shape[0], probs.shape[1], round, rounds)
        if self.config.max_per_class is not None:
            k = min(k, self.config.max_per_class)
        picked = fill_top_k(probs, k, allowed=candidates)
        targets = candidate_targets(probs[picked.index], candidates[picked.index])
        return PseudoLabels(picked.index, picked.labels, targets)
