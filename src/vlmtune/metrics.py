"""Scores used by the runner and protocols (CLIP_benchmark's names: acc1, acc5, mean_per_class_recall)."""

from __future__ import annotations

import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return topk_accuracy(logits, labels, 1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percent of samples whose label is among the ``k`` highest logits (all of them when K <= k)."""
    if labels.numel() == 0:
        return float("nan")
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices.cpu()  # (N, k)
    return 100.0 * float((top == labels.cpu()[:, None]).any(-1).float().mean())


def mean_per_class_recall(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Recall averaged over the classes present in ``labels`` (in percent), for imbalanced test sets."""
    pred, labels = logits.argmax(-1).cpu(), labels.cpu()
    recalls = [float((pred[labels == c] == c).float().mean()) for c in labels.unique()]
    return 100.0 * sum(recalls) / len(recalls) if recalls else float("nan")


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 and mean per-class recall, in percent, rounded to 2 decimals."""
    out = {
        "acc1": accuracy(logits, labels),
        "acc5": topk_accuracy(logits, labels, 5),
        "mean_per_class_recall": mean_per_class_recall(logits, labels),
    }
    return {k: round(v, 2) for k, v in out.items()}


def harmonic_mean(base: float, new: float) -> float:
    """Base-to-new harmonic mean H = 2 B N / (B + N)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0
