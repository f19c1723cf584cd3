"""Issue-3 evidence on the toy world: 16-shot, seeds 1-3 averaged, two shifted tasks.

Claims of papers 000/001 checked (tests that can fail): zero-shot < BBT < CraFT, CraFT >= zero-shot + 10 points on at
least one task, and the ablation ordering PG+PR+Co >= PG only (= BBT). Zero-shot is the better of the dataset's
template and "a photo of a {}." (the black-box methods prompt the second, as the reference does): on the sketch
task most of the zero-shot gap is the template (19.8 vs 81.1).

The full-budget version (paper defaults, 8000 queries) is slow-marked, as is the same table at 1050 queries with
popsize 20 and a 64-dimensional subspace over seeds 1-3; the default suite runs the 1050-query table for seed 1
(measured: toynet-sketch zero-shot 81.1 < BBT 84.1 < CraFT 91.4; nonce-shapes BBT 21.4 < CraFT 67.2; seeds 2 and
3 agree). At 1050 queries BBT has not yet left zero-shot on toy:nonce-shapes (20.5 vs 20.0 over seeds 1-3: made-up
names give the prompt little to start from), so the reduced test asserts BBT > zero-shot on toy:toynet-sketch only,
and BBT < CraFT on both.
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
REDUCED = {"budget": 1050, "popsize": 20, "subspace": 64}  # 50 generations of 20 candidates (+ the mean prompt)
PHOTO = {"template": "a photo of a {}."}


@cache
def _splits(dataset: str):
    return load_dataset(dataset)


def _acc(toy, dataset: str, method: str, options: dict, seed: int) -> float:
    cfg = RunConfig(method=method, dataset=dataset, shots=16, seed=seed, options=options)
    return run(cfg, progress=False, backbone=toy, splits=_splits(dataset)).accuracy["test"]


def _table(toy, scale: dict, rows: tuple[str, ...], seeds: tuple[int, ...] = SEEDS) -> dict[tuple[str, str], float]:
    means = {}
    for dataset in TASKS:
        means[dataset, "zeroshot"] = max(_acc(toy, dataset, "zeroshot", o, 1) for o in ({}, PHOTO))
        for row in rows:
            method, options = ROWS[row]
            means[dataset, row] = statistics.mean(_acc(toy, dataset, method, {**options, **scale}, s) for s in seeds)
    print(means)
    return means


def test_pg_only_is_bbt(toy):
    scale = {"budget": 120, "popsize": 10, "subspace": 32}
    pg_only = _acc(toy, "toy:nonce-shapes", "craft", {**scale, "use_head": False}, 1)
    assert pg_only == _acc(toy, "toy:nonce-shapes", "bbt", scale, 1)


@pytest.mark.parametrize("seeds", [pytest.param(SEEDS, marks=pytest.mark.slow), (1,)], ids=["seeds1-3", "seed1"])
def test_blackbox_ordering_reduced_budget(toy, seeds):
    means = _table(toy, REDUCED, ("bbt", "craft"), seeds)
    sketch, nonce = TASKS
    assert means[sketch, "zeroshot"] < means[sketch, "bbt"] < means[sketch, "craft"]
    assert means[nonce, "bbt"] < means[nonce, "craft"]  # so PG+PR+Co >= PG only on both
    assert any(means[d, "craft"] >= means[d, "zeroshot"] + 10 for d in TASKS)


@pytest.mark.slow
def test_blackbox_ordering_full_budget(toy):
    means = _table(toy, {}, ("bbt", "craft", "pr_only"))
    for dataset in TASKS:
        zs, bbt, craft = (means[dataset, r] for r in ("zeroshot", "bbt", "craft"))
        assert zs < bbt < craft, (dataset, zs, bbt, craft)
    assert any(means[d, "craft"] >= means[d, "zeroshot"] + 10 for d in TASKS)
