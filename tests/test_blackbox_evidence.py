"""Issue-3 evidence on the toy world: 16-shot, seeds 1-3 averaged, two shifted tasks.

Claims of papers 000/001 checked (tests that can fail): zero-shot < BBT < CraFT on both tasks, CraFT >= zero-shot + 10
points on at least one, and the ablation ordering PG+PR+Co >= PR only and >= PG only. PG only is BBT: the prompt
module alone with the cross-entropy fitness draws the same candidates from the same seeds (checked below).

The full-budget version (paper defaults, 8000 queries) is slow-marked; the default suite runs the same table at a
reduced budget and subspace.
"""

from __future__ import annotations

import statistics
from functools import cache

import pytest

from vlmtune import load_dataset
from vlmtune.runs.runner import RunConfig, run

TASKS = ("toy:toynet-sketch", "toy:nonce-shapes")
SEEDS = (1, 2, 3)
ROWS = {"bbt": ("bbt", {}), "craft": ("craft", {}), "pr_only": ("craft", {"use_prompt": False})}
REDUCED = {"budget": 2100, "popsize": 20, "subspace": 64}  # 100 generations of 20 candidates (+ the mean prompt)


@cache
def _splits(dataset: str):
    return load_dataset(dataset)


def _acc(toy, dataset: str, method: str, options: dict, seed: int) -> float:
    cfg = RunConfig(method=method, dataset=dataset, shots=16, seed=seed, options=options)
    return run(cfg, progress=False, backbone=toy, splits=_splits(dataset)).accuracy["test"]


def _table(toy, scale: dict, ablation_tasks: tuple[str, ...]) -> dict[tuple[str, str], float]:
    means = {}
    for dataset in TASKS:
        means[dataset, "zeroshot"] = _acc(toy, dataset, "zeroshot", {}, 1)
        for row, (method, options) in ROWS.items():
            if row == "pr_only" and dataset not in ablation_tasks:
                continue
            accs = [_acc(toy, dataset, method, {**options, **scale}, seed) for seed in SEEDS]
            means[dataset, row] = statistics.mean(accs)
    print(means)
    return means


def _check(means: dict[tuple[str, str], float], ablation_tasks: tuple[str, ...]) -> None:
    for dataset in TASKS:
        zs, bbt, craft = (means[dataset, r] for r in ("zeroshot", "bbt", "craft"))
        assert zs < bbt < craft, (dataset, zs, bbt, craft)  # so PG+PR+Co >= PG only (= BBT) too
    for dataset in ablation_tasks:
        assert means[dataset, "craft"] >= means[dataset, "pr_only"], dataset  # PG+PR+Co >= PR only
    assert any(means[d, "craft"] >= means[d, "zeroshot"] + 10 for d in TASKS)


def test_pg_only_is_bbt(toy):
    scale = {"budget": 120, "popsize": 10, "subspace": 32}
    pg_only = _acc(toy, "toy:nonce-shapes", "craft", {**scale, "use_head": False}, 1)
    assert pg_only == _acc(toy, "toy:nonce-shapes", "bbt", scale, 1)


def test_blackbox_ordering_reduced_budget(toy):
    # At a reduced budget the PR-only ordering holds on toy:toynet-sketch; on toy:nonce-shapes (names carry no
    # information, the prompt module gains slowly) the head trained on fixed zero-shot outputs is ahead until the
    # full budget (docs/fidelity.md, "Evidence on the toy world").
    ablation_tasks = TASKS[:1]
    _check(_table(toy, REDUCED, ablation_tasks), ablation_tasks)


@pytest.mark.slow
def test_blackbox_ordering_full_budget(toy):
    _check(_table(toy, {}, TASKS), TASKS)
