"""Plots people would rather look at than read: accuracy vs queries (CraFT paper, Fig. 3), training curves."""

from __future__ import annotations

import csv
import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@functools.cache
def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (warned once) when the plot extra is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning('matplotlib is not installed: plots are skipped (pip install "vlmtune[plot]")')
        return None
    return plt


def write_curve(folder: Path, curve: Sequence[tuple[int, float]], title: str) -> None:
    """``curve.csv`` (queries, test accuracy) and, when matplotlib is installed, ``curve.png``."""
    with (folder / "curve.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["queries", "test_accuracy"])
        writer.writerows((q, f"{a:.2f}") for q, a in curve)
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([q for q, _ in curve], [a for _, a in curve], marker="o", markersize=3)
    ax.set_xlabel("queries to the black box")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "curve.png")
    plt.close(fig)
