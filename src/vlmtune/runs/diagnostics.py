"""Pseudo-label diagnostics of label-free runs, measured by the runner against labels the method never sees.

A label-free method reports each pseudo-labelling through ``TrainingHooks.pseudo_labels(round, kind, index,
labels)`` into a ``PseudoLabelReports`` recorder (no labels in it); after ``fit`` returns, ``PseudoLabelLog``
holds the hidden labels of the unlabelled set and scores each report: how many images,
their accuracy, the classes covered and the smallest / largest class; ``write_pseudo_labels`` puts its rows in a run
folder as ``pseudo_labels.jsonl`` and ``pseudo_labels.png`` (accuracy per round of all images vs the selected set).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlmtune.runs.plots import pyplot


class PseudoLabelReports:
    """What a label-free method reported through ``hooks.pseudo_labels`` during ``fit``, held as given: the hook the
    method calls is this recorder, which holds no label; the runner scores the reports after ``fit`` returns."""

    def __init__(self) -> None:
        self.reports: list[tuple[int, str, torch.Tensor, torch.Tensor, str, torch.Tensor | None]] = []

    def record(
        self,
        round_no: int,
        kind: str,
        index: torch.Tensor,
        labels: torch.Tensor,
        source: str = "",
        confidence: torch.Tensor | None = None,
    ) -> None:
        conf = confidence.clone() if confidence is not None else None
        self.reports.append((round_no, kind, index.clone(), labels.clone(), source, conf))


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` (M,) for the boolean ``positive`` (M,) (ties count half); None when
    one of the two groups is empty."""
    pos, neg = scores[positive].double(), scores[~positive].double()
    if not len(pos) or not len(neg):
        return None
    ranks = torch.cat([pos, neg]).argsort().argsort().double() + 1  # 1-based ranks (ties: by position)
    values = torch.cat([pos, neg])
    for v in values.unique():  # average ranks of ties
        tied = values == v
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


class PseudoLabelLog:
    """Accuracy and coverage of reported pseudo-labels; ``hidden`` (N,) are the unlabelled set's true labels."""

    def __init__(self, hidden: torch.Tensor, num_classes: int) -> None:
        self.hidden, self.num_classes = hidden.long(), num_classes
        self.rows: list[dict[str, Any]] = []

    def record(
        self,
        round_no: int,
        kind: str,
        index: torch.Tensor,
        labels: torch.Tensor,
        source: str = "",
        confidence: torch.Tensor | None = None,
    ) -> None:
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self.hidden)):
            raise IndexError(f"pseudo-labels point outside the unlabelled set of {len(self.hidden)} images")
        counts = torch.bincount(labels, minlength=self.num_classes)
        truth = self.hidden[index]
        known = truth >= 0  # images of an unlabelled folder have no truth (-1): accuracy only where it exists
        right = truth[known] == labels[known]
        correct = right.float()
        row: dict[str, Any] = {
            "round": round_no,
            "kind": kind,
            **({"source": source} if source else {}),
            "n": int(index.numel()),
            "accuracy": round(100 * float(correct.mean()), 2) if correct.numel() else None,
            "classes_covered": int((counts > 0).sum()),
            "classes": self.num_classes,
            "per_class_min": int(counts.min()),
            "per_class_max": int(counts.max()),
        }
        if confidence is not None and correct.numel():
            conf = confidence[known]
            separation = auroc(conf, right)
            row["auroc"] = round(separation, 4) if separation is not None else None
            if kind == "filter":  # kept = confidence > 0: precision and recall of the right labels
                kept = conf > 0
                row["kept"] = int(kept.sum())
                row["precision"] = round(100 * float(right[kept].float().mean()), 2) if kept.any() else None
                row["recall"] = round(100 * float(kept[right].float().mean()), 2) if right.any() else None
        self.rows.append(row)

    def score(self, reports: PseudoLabelReports) -> list[dict[str, Any]]:
        """The rows of every recorded report, in the order they were made."""
        for report in reports.reports:
            self.record(*report)
        return self.rows


def write_pseudo_labels(folder: Path, rows: list[dict[str, Any]], title: str) -> None:
    """``pseudo_labels.jsonl`` (one ``PseudoLabelLog`` row per line) and, with matplotlib, ``pseudo_labels.png``."""
    with (folder / "pseudo_labels.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    plt = pyplot()
    if plt is None or not rows:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    labels = {"all": "all unlabelled images", "selected": "selected (trained on)", "clean": "clean set (filtered)"}
    styles = {"all": {"linestyle": "--", "marker": "s"}, "selected": {"marker": "o"}, "clean": {"marker": "^"}}
    for kind, style in styles.items():
        for source in dict.fromkeys(r.get("source", "") for r in rows if r["kind"] == kind):
            measured = [r for r in rows if (r["kind"], r.get("source", "")) == (kind, source)]
            measured = [r for r in measured if r["accuracy"] is not None]
            if measured:
                label = labels[kind] + (f", {source}" if source else "")
                ax.plot([r["round"] for r in measured], [r["accuracy"] for r in measured], label=label, **style)
    ax.set_xlabel("round (0 = zero-shot)")
    ax.set_ylabel("pseudo-label accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    selected = {r["round"]: r["n"] for r in rows if r["kind"] == "selected"}  # the last reported per round
    if selected:
        twin = ax.twinx()
        twin.bar(list(selected), list(selected.values()), alpha=0.15, color="grey")
        twin.set_ylabel("images selected", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "pseudo_labels.png")
    plt.close(fig)
