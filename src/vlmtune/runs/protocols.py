"""Evaluation protocols of the papers as runners over any registered method (all through ``runner.run``).

- ``few_shot_sweep``: shots x seeds, test accuracy (TMM Table 2, CoOp's curves);
- ``base_to_new``: train on the base half of the classes, test on base and on new classes, harmonic mean (Table 1);
- ``transfer``: train on a source dataset, test on targets: other datasets (cross-dataset, Table 3) or the
  source's shifted variants with the same classes (domain generalisation, Table 4).

Model selection happens inside ``run`` on validation shots only; test splits are only scored. Each protocol
returns a ``ProtocolResult`` (rows of per-seed numbers) that writes JSON, CSV, a Markdown table of mean ± std and,
for sweeps, a plot of accuracy vs shots.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune.backbones import load_backbone
from vlmtune.backbones.base import Backbone
from vlmtune.data import load_dataset
from vlmtune.data.base import DatasetSplit
from vlmtune.data.fewshot import base_new_split
from vlmtune.features.cache import FeatureCache
from vlmtune.metrics import harmonic_mean
from vlmtune.runs.report import fmt_mean_std, markdown_table
from vlmtune.runs.runner import FeatureSource, RunConfig, run, score_split

log = logging.getLogger(__name__)
Options = dict[str, dict[str, Any]]  # method -> its options


@dataclass
class ProtocolResult:
    """Per-seed results: one row per (method, setting, seed) with named metrics (accuracies in %)."""

    protocol: str
    columns: list[str]  # metric names, in table order
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, method: str, setting: str, seed: int, metrics: dict[str, float | None]) -> None:
        self.rows.append({"method": method, "setting": setting, "seed": seed, **metrics})

    def summary(self) -> list[list[str]]:
        """Mean ± std over seeds per (method, setting) and metric."""
        keys = list(dict.fromkeys((r["method"], r["setting"]) for r in self.rows))
        out = []
        for method, setting in keys:
            rows = [r for r in self.rows if r["method"] == method and r["setting"] == setting]
            cells = [fmt_mean_std([r[c] for r in rows if r.get(c) is not None]) for c in self.columns]
            out.append([method, setting, *cells])
        return out

    def mean(self, method: str, setting: str, column: str) -> float:
        values = [r[column] for r in self.rows if (r["method"], r["setting"]) == (method, setting)]
        return statistics.mean(v for v in values if v is not None)

    def markdown(self) -> str:
        return markdown_table(["method", "setting", *self.columns], self.summary())

    def write(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps({"protocol": self.protocol, "rows": self.rows}, indent=1))
        with (folder / "results.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, ["method", "setting", "seed", *self.columns])
            writer.writeheader()
            writer.writerows(self.rows)
        (folder / "results.md").write_text(self.markdown() + "\n")
        if self.protocol == "few-shot":
            _plot_sweep(self, folder / "accuracy_vs_shots.png")
        return folder


def _plot_sweep(result: ProtocolResult, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: %s skipped", path.name)
        return
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for method in dict.fromkeys(r["method"] for r in result.rows):
        shots = sorted({int(r["setting"]) for r in result.rows if r["method"] == method})
        means = [result.mean(method, str(s), "test") for s in shots]
        ax.plot(shots, means, marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@dataclass
class _Context:
    backbone: Backbone
    cache: FeatureCache | None
    options: Options
    progress: bool
    splits: dict[str, dict[str, DatasetSplit]] = field(default_factory=dict)

    def data(self, dataset: str) -> dict[str, DatasetSplit]:
        if dataset not in self.splits:
            self.splits[dataset] = load_dataset(dataset)
        return self.splits[dataset]

    def run(self, method: str, dataset: str, shots: int, seed: int, subsample: str = "all") -> Any:
        cfg = RunConfig(
            method=method,
            dataset=dataset,
            backbone=self.backbone.spec,
            shots=shots,
            seed=seed,
            subsample=subsample,
            options=self.options.get(method, {}),
        )
        return run(cfg, cache=self.cache, progress=False, backbone=self.backbone, splits=self.data(dataset))

    def score(self, classifier: Any, split: DatasetSplit) -> float | None:
        """Accuracy of ``classifier`` on ``split``'s classes (re-targeted to its names when they differ)."""
        if classifier.classnames != split.classnames:
            try:
                classifier = classifier.for_classnames(split.classnames, self.backbone)
            except (NotImplementedError, TypeError):
                return None  # the method cannot describe classes it was not trained on
        source = FeatureSource(self.backbone, self.cache, False)  # score_split adds patch features if needed
        return score_split(classifier, self.backbone, split, source, False)


def _context(backbone: str | Backbone, cache: FeatureCache | None, options: Options | None, progress: bool):
    bb = load_backbone(backbone) if isinstance(backbone, str) else backbone
    return _Context(bb, cache, options or {}, progress)


def _each(jobs: list[tuple[Any, ...]], progress: bool, what: str, fn: Callable[..., None]) -> None:
    from tqdm import tqdm

    for job in tqdm(jobs, desc=what, unit="run", disable=not progress):
        fn(*job)


def few_shot_sweep(
    methods: Sequence[str],
    dataset: str,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: Sequence[int] = (1, 2, 3),
    backbone: str | Backbone = "toy",
    cache: FeatureCache | None = None,
    options: Options | None = None,
    progress: bool = True,
) -> ProtocolResult:
    ctx = _context(backbone, cache, options, progress)
    result = ProtocolResult("few-shot", ["test"])

    def one(method: str, k: int, seed: int) -> None:
        result.add(method, str(k), seed, {"test": ctx.run(method, dataset, k, seed).accuracy["test"]})

    _each([(m, k, s) for m in methods for k in shots for s in seeds], progress, f"few-shot {dataset}", one)
    return result


def base_to_new(
    methods: Sequence[str],
    dataset: str,
    shots: int = 16,
    seeds: Sequence[int] = (1, 2, 3),
    backbone: str | Backbone = "toy",
    cache: FeatureCache | None = None,
    options: Options | None = None,
    progress: bool = True,
) -> ProtocolResult:
    ctx = _context(backbone, cache, options, progress)
    result = ProtocolResult("base-to-new", ["base", "new", "H"])
    new_test = base_new_split(ctx.data(dataset)["test"], "new")

    def one(method: str, seed: int) -> None:
        res = ctx.run(method, dataset, shots, seed, subsample="base")  # trained and tested on base classes
        base, new = res.accuracy["test"], ctx.score(res.classifier, new_test)
        hm = harmonic_mean(base, new) if new is not None else None
        result.add(method, dataset, seed, {"base": base, "new": new, "H": hm})

    _each([(m, s) for m in methods for s in seeds], progress, f"base-to-new {dataset}", one)
    return result


def transfer(
    methods: Sequence[str],
    source: str,
    targets: Sequence[str],
    shots: int = 16,
    seeds: Sequence[int] = (1, 2, 3),
    backbone: str | Backbone = "toy",
    cache: FeatureCache | None = None,
    options: Options | None = None,
    progress: bool = True,
) -> ProtocolResult:
    """Cross-dataset transfer or domain generalisation: columns = source, then each target (test accuracy)."""
    ctx = _context(backbone, cache, options, progress)
    result = ProtocolResult("transfer", [source, *targets])

    def one(method: str, seed: int) -> None:
        res = ctx.run(method, source, shots, seed)
        metrics: dict[str, float | None] = {source: res.accuracy["test"]}
        for target in targets:
            metrics[target] = ctx.score(res.classifier, ctx.data(target)["test"])
        result.add(method, f"{source} ->", seed, metrics)

    _each([(m, s) for m in methods for s in seeds], progress, f"transfer from {source}", one)
    return result
