"""Black-box table on the toy world: zero-shot / BBT / CraFT (+ ablations), 16-shot, mean ± std over seeds.

    python benchmarks/blackbox_toy.py [--tasks toy:toynet-sketch toy:shapes-sketch] [--seeds 1 2 3] [--ablations]

Every number is measured in this run (full budget by shots: 8000 queries at 16 shots).
"""

from __future__ import annotations

import argparse
import time

import torch

from vlmtune import load_backbone, load_dataset
from vlmtune.runs.report import fmt_mean_std, markdown_table
from vlmtune.runs.runner import RunConfig, run

ABLATIONS = {
    "PG only": {"use_head": False},
    "PR only": {"use_prompt": False},
    "PG+PR, no collaboration": {"collaborative": False},
    "no residual": {"residual": False},
    "linear head": {"head": "linear"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["toy:toynet-sketch", "toy:shapes-sketch", "toy:nonce-shapes"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--ablations", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    backbone = load_backbone("toy")
    rows_spec = [("zero-shot", "zeroshot", {}), ("BBT", "bbt", {}), ("CraFT", "craft", {})]
    if args.ablations:
        rows_spec += [(f"CraFT: {name}", "craft", opts) for name, opts in ABLATIONS.items()]
    table: dict[str, list[str]] = {label: [] for label, _, _ in rows_spec}
    start = time.perf_counter()
    for dataset in args.tasks:
        splits = load_dataset(dataset)
        for label, method, opts in rows_spec:
            seeds = args.seeds if method != "zeroshot" else args.seeds[:1]
            accs = []
            for seed in seeds:
                cfg = RunConfig(method=method, dataset=dataset, shots=args.shots, seed=seed, options=opts)
                accs.append(run(cfg, progress=False, backbone=backbone, splits=splits).accuracy["test"])
            table[label].append(fmt_mean_std(accs))
            print(f"{dataset:20s} {label:28s} {fmt_mean_std(accs)}  ({time.perf_counter() - start:.0f} s)", flush=True)
    print()
    print(markdown_table(["method", *args.tasks], [[label, *cells] for label, cells in table.items()]))
    print(f"\n{args.shots}-shot, seeds {args.seeds}, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
