"""Run a recipe's groups through the protocols and put our numbers beside the paper's, cell by cell.

Each group is one protocol call with its own job log (``<out>/jobs/<group>/jobs.jsonl``, always resumed), so an
interrupted reproduction continues where it stopped. The comparison is written as Markdown (one table per
backbone: ours mean ± std over seeds / the paper's / the difference), CSV (one line per cell) and JSON, with the
exact settings, package versions and the git revision in ``settings.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune._io import atomic_write
from vlmtune.features.cache import FeatureCache
from vlmtune.methods.registry import get_method
from vlmtune.metrics import harmonic_mean
from vlmtune.reproduce.plan import Group
from vlmtune.reproduce.recipes import Recipe, Row
from vlmtune.reproduce.toy import toy_options
from vlmtune.runs import protocols
from vlmtune.runs.protocols import ProtocolResult, ProtocolSettings
from vlmtune.runs.provenance import provenance
from vlmtune.runs.report import markdown_table
from vlmtune.settings import ExecSettings, exec_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings(ExecSettings):
    """How the groups run (the ``ProtocolSettings`` every group shares) and the user's per-row option overrides."""

    out: Path
    cache: FeatureCache | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # row label -> options over the recipe's
    jobs: int = 1
    progress: bool = True
    executor: str | None = None  # ProtocolSettings.executor
    executor_options: dict[str, Any] = field(default_factory=dict)
    toy: bool = False  # the recipe mapped onto the toy world (options fitted to the toy model)


@dataclass
class Reproduction:
    """Per-seed values per (backbone, row, column), the groups that failed, and the comparison with the paper."""

    recipe: Recipe
    values: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    failed: list[tuple[Group, str]] = field(default_factory=list)
    per_dataset: dict[tuple[str, str, str, str], list[float]] = field(default_factory=dict)  # shots mode
    toy_note: str = ""  # on the toy world: which toy task stood for which dataset

    def add(self, backbone: str, row: str, column: str, values: list[float]) -> None:
        if values:
            self.values[backbone, row, column] = values

    def cells(self) -> list[dict[str, Any]]:
        """One entry per (backbone, row, paper column) we measured: ours (mean, std, seeds), paper, difference."""
        out = []
        paper = self.recipe.paper
        for (backbone, row, column), values in self._with_averages().items():
            mean = statistics.mean(values)
            theirs = paper.get(row, column, backbone)
            out.append(
                {
                    "backbone": backbone,
                    "row": row,
                    "column": column,
                    "ours": round(mean, 2),
                    "std": round(statistics.stdev(values), 2) if len(values) > 1 else None,
                    "seeds": len(values),
                    "paper": theirs,
                    "diff": None if theirs is None else round(mean - theirs, 2),
                }
            )
        return out

    def _with_averages(self) -> dict[tuple[str, str, str], list[float]]:
        """The measured cells plus ``avg`` columns (the mean of a row's dataset means, where all are measured)."""
        out = dict(self.values)
        columns = self.recipe.paper.columns
        keys = {(b, r) for b, r, _ in self.values}
        for b, r in keys:
            for metric in ("", "/base", "/new"):
                avg = "avg" + metric
                if avg not in columns:
                    continue
                parts = [c for c in columns if c.endswith(metric) and c != avg and (metric or "/" not in c)]
                if self.recipe.protocol == "transfer":
                    parts = parts[1:]  # the papers average the targets, not the source
                means = [statistics.mean(out[b, r, c]) for c in parts if (b, r, c) in out]
                if means and len(means) == len(parts):
                    out[b, r, avg] = [statistics.mean(means)]
            if (b, r, "avg/base") in out and (b, r, "avg/new") in out and "avg/H" in columns:
                out[b, r, "avg/H"] = [harmonic_mean(out[b, r, "avg/base"][0], out[b, r, "avg/new"][0])]
        return out

    def markdown(self) -> str:
        """One table per backbone: a row per paper row, a column per paper column; cells "ours / paper (diff)"."""
        recipe = self.recipe
        cells = self.cells()
        parts = [f"# {recipe.name}: {recipe.title}", ""]
        if recipe.note:
            parts += [recipe.note, ""]
        if self.toy_note:
            parts += [self.toy_note, ""]
        for backbone in dict.fromkeys(c["backbone"] for c in cells):
            mine = {(c["row"], c["column"]): c for c in cells if c["backbone"] == backbone}
            columns = [c for c in recipe.paper.columns if any(col == c for _, col in mine)]
            rows = []
            for row in recipe.rows:
                if row.method is not None and not any(r == row.label for r, _ in mine):
                    continue  # a row not run this time
                line = [row.label + ("" if row.method else " (not in vlmtune)")]
                for column in columns:
                    cell = mine.get((row.label, column))
                    theirs = recipe.paper.get(row.label, column, backbone)
                    line.append(_cell(cell, theirs))
                rows.append(line)
            parts += [f"## {backbone}: ours / paper (difference)", "", markdown_table(["row", *columns], rows), ""]
        for group, error in self.failed:
            parts.append(
                f"- failed: {group.backbone} {group.dataset} ({', '.join(r.label for r in group.rows)}): {error}"
            )
        return "\n".join(parts).rstrip() + "\n"


def _cell(cell: dict[str, Any] | None, theirs: float | None) -> str:
    paper = "-" if theirs is None else f"{theirs:.2f}"
    if cell is None:
        return f"- / {paper}"
    ours = f"{cell['ours']:.1f}" + (f" ± {cell['std']:.1f}" if cell["std"] is not None else "")
    diff = "" if cell["diff"] is None else f" ({cell['diff']:+.1f})"
    return f"{ours} / {paper}{diff}"


def _call(group: Group, settings: ProtocolSettings) -> ProtocolResult:
    methods = [f"{r.label}={r.method}" for r in group.rows]
    d, seeds = group.run_dataset, group.seeds
    if group.protocol == "few-shot":
        return protocols.few_shot_sweep(methods, d, group.shots, seeds, settings)
    if group.protocol == "base-to-new":
        return protocols.base_to_new(methods, d, group.shots[0], seeds, settings)
    if group.protocol == "transfer":
        return protocols.transfer(methods, d, [t for _, t in group.targets], group.shots[0], seeds, settings)
    if group.protocol == "unsupervised":
        return protocols.unsupervised(methods, d, seeds, settings)
    if group.protocol == "noisy-labels":
        return protocols.noisy_labels(methods, d, group.noise, seeds, settings)
    assert group.student is not None
    return protocols.distill(methods, d, group.spec, group.student, seeds, settings)


def _collect(rep: Reproduction, group: Group, result: ProtocolResult) -> None:
    """The protocol's per-seed numbers into the recipe's cells."""
    for row in group.rows:
        b, r = group.backbone, row.label
        settings = list(dict.fromkeys(x["setting"] for x in result.rows if x["method"] == r))
        if group.protocol == "few-shot":
            for k in group.shots:
                values = result.values(r, str(k), "test")
                if rep.recipe.columns == "shots":
                    rep.per_dataset[b, r, str(k), group.dataset] = values
                else:
                    rep.add(b, r, group.dataset, values)
        elif group.protocol == "base-to-new":
            for metric in ("base", "new", "H"):
                rep.add(b, r, f"{group.dataset}/{metric}", result.values(r, settings[0], metric))
        elif group.protocol == "transfer":
            rep.add(b, r, group.dataset, result.values(r, settings[0], group.run_dataset))
            for paper_name, run_name in group.targets:
                rep.add(b, r, paper_name, result.values(r, settings[0], run_name))
        elif group.protocol == "distill":  # distilling methods: teacher -> student; the others: the student alone
            assert row.method is not None
            distils = get_method(row.method).supports_student
            chosen = next(s for s in settings if ("->" in s) == distils and (distils or group.student in s))
            rep.add(b, r, group.dataset, result.values(r, chosen, "test"))
        else:
            rep.add(b, r, group.dataset, result.values(r, settings[0], "test"))


def _shots_columns(rep: Reproduction, datasets: int) -> None:
    """Ablation tables: each shot count's cell is the mean over the datasets (per seed), once all are measured."""
    keys = {(b, r, k) for b, r, k, _ in rep.per_dataset}
    for b, r, k in keys:
        per = [v for (b2, r2, k2, _), v in rep.per_dataset.items() if (b2, r2, k2) == (b, r, k) and v]
        if len(per) == datasets:
            seeds = min(map(len, per))
            rep.add(b, r, k, [statistics.mean(v[i] for v in per) for i in range(seeds)])


def execute(
    recipe: Recipe,
    groups: list[Group],
    settings: RunSettings,
    on_group: Callable[[int, Group], None] | None = None,
) -> Reproduction:
    """Run ``groups`` (each resumed from its job log) and compare with the paper; a group that fails is reported,
    the others still run."""
    rep = Reproduction(recipe)
    if settings.toy:
        names = {g.dataset: g.run_dataset for g in groups} | {p: r for g in groups for p, r in g.targets}
        stand = ", ".join(f"{p} = {r}" for p, r in names.items())
        rep.toy_note = f"On the toy world (the toy model; the paper's numbers are {groups[0].backbone}'s): {stand}."
    for i, group in enumerate(groups):
        if on_group is not None:
            on_group(i, group)
        options = {r.label: _options(r, settings) for r in group.rows}
        ps = ProtocolSettings(
            backbone=group.spec,
            cache=settings.cache,
            options=options,
            progress=settings.progress,
            jobs=settings.jobs,
            out=settings.out / "jobs" / group.slug,
            resume=True,
            executor=settings.executor,
            executor_options=settings.executor_options,
            **exec_of(settings),
        )
        try:
            _collect(rep, group, _call(group, ps))
        except Exception as e:  # one group's failure (a corrupt image, a missing file) does not stop the others
            log.error("%s %s: %s", group.backbone, group.dataset, e)
            rep.failed.append((group, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    if recipe.columns == "shots":
        _shots_columns(rep, len({g.dataset for g in groups}))
    return rep


def write(rep: Reproduction, groups: list[Group], settings: RunSettings) -> Path:
    """``<out>/results.{md,csv,json}`` and ``settings.json`` (recipe, groups, options, versions, git revision)."""
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    cells = rep.cells()

    def save(name: str, text: str) -> None:
        atomic_write(out / name, lambda tmp: Path(tmp).write_text(text))

    save("results.md", rep.markdown())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["backbone", "row", "column", "ours", "std", "seeds", "paper", "diff"])
    writer.writeheader()
    writer.writerows(cells)
    save("results.csv", buf.getvalue())
    save("results.json", json.dumps({"recipe": rep.recipe.name, "cells": cells}, indent=1))
    info = {
        "recipe": rep.recipe.name,
        "table": rep.recipe.table,
        "caption": rep.recipe.title,
        "toy": settings.toy,
        "groups": [_group_json(g, settings) for g in groups],
        "failed": [{"group": g.slug, "error": e} for g, e in rep.failed],
        **exec_of(settings),
        **provenance(),
    }
    save("settings.json", json.dumps(info, indent=1))
    return out


def _group_json(group: Group, settings: RunSettings) -> dict[str, Any]:
    out = dataclasses.asdict(group)
    out["rows"] = [{"label": r.label, "method": r.method, "options": _options(r, settings)} for r in group.rows]
    return out


def _options(row: Row, settings: RunSettings) -> dict[str, Any]:
    """The recipe's options of ``row``, the user's over them (and, on the toy world, fitted to the toy model)."""
    options = {**row.options, **settings.options.get(row.label, {})}
    assert row.method is not None
    return toy_options(row.method, options) if settings.toy else options
