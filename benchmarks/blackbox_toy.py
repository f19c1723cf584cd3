"""Black-box table on the toy world: zero-shot / BBT / CraFT (+ ablations), 16-shot, mean ± std over seeds.

    python benchmarks/blackbox_toy.py [--tasks toy:toynet-sketch toy:nonce-shapes] [--seeds 1 2 3] [--ablations]
                                      [--vp] [--rows CraFT "CraFT + vp"] [--jobs 8] [--device cuda] [--json out.json]

Every number is measured in this run (full budget by shots: 8000 queries at 16 shots). ``--jobs N`` runs N
single-threaded processes side by side (each run is seeded on its own). ``--vp`` adds CraFT + visual prompts
(App. B): every candidate re-encodes every training image, so it wants a GPU (``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from typing import Any

import torch

from vlmtune import load_backbone, load_dataset
from vlmtune.runs.report import fmt_mean_std, markdown_table
from vlmtune.runs.runner import RunConfig, run

ABLATIONS = {
    "PG only": {"use_head": False},
    "PR only": {"use_prompt": False},
    "PG+PR, no collaboration": {"training": "iterative"},
    "PG then PR (sequential)": {"training": "sequential"},
    "no residual": {"residual": False},
    "linear head": {"head": "linear"},
    "reference head (2x256, Adam)": {"head_layers": 2, "head_hidden": 256, "optimizer": "adam"},
}


@cache
def _world(dataset: str, device: str) -> tuple[Any, Any]:
    return load_backbone("toy", device), load_dataset(dataset)


def _one(job: tuple[str, str, str, dict[str, Any], int, int, int, str]) -> tuple[str, str, int, float]:
    dataset, label, method, opts, seed, shots, threads, device = job
    torch.set_num_threads(threads)
    backbone, splits = _world(dataset, device)
    cfg = RunConfig(method=method, dataset=dataset, shots=shots, seed=seed, options=opts, device=device)
    return dataset, label, seed, run(cfg, progress=False, backbone=backbone, splits=splits).accuracy["test"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["toy:toynet-sketch", "toy:nonce-shapes", "toy:shapes-sketch"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--ablations", action="store_true")
    ap.add_argument("--preset", action="append", default=[], help="add a CraFT row with this preset (repeatable)")
    ap.add_argument("--vp", action="store_true", help="add the CraFT + visual prompts row")
    ap.add_argument("--rows", nargs="+", help="only these rows (labels as printed)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1, help="processes side by side (1 thread each when > 1)")
    ap.add_argument("--json", help="also write the per-seed accuracies here")
    args = ap.parse_args()
    rows_spec = [
        ("zero-shot", "zeroshot", {}),
        ('zero-shot, "a photo of a {}."', "zeroshot", {"template": "a photo of a {}."}),
        ("BBT", "bbt", {}),
        ("CraFT", "craft", {}),
    ]
    if args.ablations:
        rows_spec += [(f"CraFT: {name}", "craft", opts) for name, opts in ABLATIONS.items()]
    rows_spec += [(f"CraFT, preset {p}", "craft", {"preset": p}) for p in args.preset]
    if args.vp:
        rows_spec.append(("CraFT + vp", "craft", {"visual_prompt": True}))
    if args.rows:
        rows_spec = [r for r in rows_spec if r[0] in args.rows]
    threads = 2 if args.jobs == 1 else 1
    jobs = [
        (dataset, label, method, opts, seed, args.shots, threads, args.device)
        for dataset in args.tasks
        for label, method, opts in rows_spec
        for seed in (args.seeds if method != "zeroshot" else args.seeds[:1])
    ]
    start = time.perf_counter()
    accs: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    with ProcessPoolExecutor(args.jobs) as pool:
        for dataset, label, seed, acc in pool.map(_one, jobs):
            accs[dataset, label][seed] = acc
            elapsed = time.perf_counter() - start
            print(f"{dataset:20s} {label:36s} seed {seed}: {acc:.1f}  ({elapsed:.0f} s)", flush=True)
    rows = [[label, *(fmt_mean_std(list(accs[d, label].values())) for d in args.tasks)] for label, _, _ in rows_spec]
    print()
    print(markdown_table(["method", *args.tasks], rows))
    elapsed = time.perf_counter() - start
    print(f"\n{args.shots}-shot, seeds {args.seeds}, {len(jobs)} runs, {args.jobs} jobs, {elapsed:.0f} s")
    if args.json:
        out = [{"dataset": d, "row": r, "seed": s, "test": a} for (d, r), v in accs.items() for s, a in v.items()]
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
