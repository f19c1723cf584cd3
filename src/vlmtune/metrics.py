"""Scores used by the runner and protocols."""

from __future__ import annotations

import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    if labels.numel() == 0:
        return float("nan")
    return 100.0 * float((logits.argmax(-1).cpu() == labels.cpu()).float().mean())


def mean_per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy averaged over classes (in percent), for imbalanced test sets."""
    pred, labels = logits.argmax(-1).cpu(), labels.cpu()
    accs = [float((pred[labels == c] == c).float().mean()) for c in labels.unique()]
    return 100.0 * sum(accs) / len(accs) if accs else float("nan")


def harmonic_mean(base: float, new: float) -> float:
    """Base-to-new harmonic mean H = 2 B N / (B + N)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0
