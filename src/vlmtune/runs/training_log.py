"""What a user sees of a long fit: a progress bar with ETA and loss, ``train_log.jsonl``, a training plot, and
TensorBoard scalars when TensorBoard is installed. Fed by ``TrainingHooks.step`` (methods never print or write)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vlmtune.runs.plots import pyplot

log = logging.getLogger(__name__)
PLOTTED = ("loss", "fitness", "mean_fitness", "head_loss")


class TrainingLog:
    """Receives (step, total, unit, metrics) from a method; writes into ``folder`` when one is given."""

    def __init__(self, folder: Path | None, progress: bool, desc: str) -> None:
        self.folder, self.progress, self.desc = folder, progress, desc
        self.rows: list[dict[str, Any]] = []
        self._bar: Any = None
        self._unit: str | None = None
        self._start = time.perf_counter()
        self._file = (folder / "train_log.jsonl").open("w") if folder is not None else None
        self._tb = self._tensorboard(folder)

    @staticmethod
    def _tensorboard(folder: Path | None) -> Any:
        if folder is None:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional
            return None
        return SummaryWriter(str(folder / "tensorboard"))

    def step(self, step: int, total: int, unit: str, metrics: dict[str, float]) -> None:
        row = {
            "unit": unit,
            "step": step,
            "total": total,
            **metrics,
            "seconds": round(time.perf_counter() - self._start, 3),
        }
        self.rows.append(row)
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"{unit}/{name}", value, step)
        if self.progress:
            if unit != self._unit or self._bar is None or step <= self._bar.n:  # a new phase (or a new sweep)
                if self._bar is not None:
                    self._bar.close()
                self._bar = tqdm(total=total, desc=f"{self.desc} ({unit}s)", unit=unit, leave=False)
                self._unit = unit
            self._bar.update(step - self._bar.n)
            shown = {k: f"{v:.4g}" for k, v in metrics.items() if k in (*PLOTTED, "queries", "reg")}
            self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self.folder is not None and self.rows:
            self._plot(self.folder / "training.png")

    def _plot(self, path: Path) -> None:
        plt = pyplot()
        if plt is None:
            return
        units = list(dict.fromkeys(r["unit"] for r in self.rows))
        fig, axes = plt.subplots(1, len(units), figsize=(5 * len(units), 3.4), dpi=110, squeeze=False)
        for ax, unit in zip(axes[0], units, strict=True):
            rows = [r for r in self.rows if r["unit"] == unit]
            sweeps: list[list[dict[str, Any]]] = []  # runs of increasing steps (e.g. one per lambda of a probe)
            for r in rows:
                if not sweeps or r["step"] <= sweeps[-1][-1]["step"]:
                    sweeps.append([])
                sweeps[-1].append(r)
            for sweep in sweeps:
                tag = f" (reg {sweep[0]['reg']:g})" if "reg" in sweep[0] else ""
                for name in PLOTTED:
                    points = [(r["step"], r[name]) for r in sweep if name in r]
                    if points:
                        ax.plot(*zip(*points, strict=True), label=name.replace("_", " ") + tag)
            ax.set_xlabel(unit)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(self.desc, fontsize=9)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
