"""Toy-world report: zero-shot and 16-shot linear-probe accuracy on every toy task, seeds 1-3.

    python benchmarks/toy_world.py [--shots 16] [--seeds 1 2 3] [--out docs/toy_world_table.md]

Prints a Markdown table (mean ± std over seeds) measured in this run, plus model size and pretraining provenance.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vlmtune import load_backbone, load_dataset
from vlmtune.backbones.toy import META_NAME, bundled_weights_dir
from vlmtune.runs.report import fmt_mean_std, markdown_table
from vlmtune.runs.runner import RunConfig, run
from vlmtune.toy.tasks import TOY_TASKS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    backbone = load_backbone("toy")
    start = time.perf_counter()
    rows = []
    for name, task in TOY_TASKS.items():
        splits = load_dataset(f"toy:{name}")
        accs: dict[str, list[float]] = {"zeroshot": [], "linear_probe": []}
        for seed in args.seeds:
            for method in accs:
                cfg = RunConfig(method=method, dataset=f"toy:{name}", shots=args.shots, seed=seed)
                accs[method].append(run(cfg, progress=False, backbone=backbone, splits=splits).accuracy["test"])
        photo = RunConfig(method="zeroshot", dataset=f"toy:{name}", options={"template": "a photo of a {}."})
        plain = run(photo, progress=False, backbone=backbone, splits=splits).accuracy["test"]
        gain = sum(accs["linear_probe"]) / len(args.seeds) - sum(accs["zeroshot"]) / len(args.seeds)
        rows.append(
            [
                f"toy:{name}",
                task.role,
                len(task.classes),
                fmt_mean_std(accs["zeroshot"]),
                f"{plain:.1f}",
                fmt_mean_std(accs["linear_probe"]),
                f"{gain:+.1f}",
            ]
        )
    table = markdown_table(
        [
            "task",
            "role",
            "classes",
            "zero-shot (%)",
            'zero-shot, "a photo of a {}." (%)',
            f"linear probe {args.shots}-shot (%)",
            "gain",
        ],
        rows,
    )
    meta = json.loads((bundled_weights_dir() / META_NAME).read_text())
    size = sum(p.stat().st_size for p in bundled_weights_dir().iterdir())
    prov = meta["provenance"]
    footer = (
        f"\nseeds {args.seeds}; ToyCLIP {prov['n_params']:,} parameters, {size / 2**20:.1f} MiB on disk; "
        f"pretrained {prov['steps']} steps x batch {prov['batch']} in {prov['seconds']:.0f} s on {prov['device']} "
        f"(torch {prov['torch']}); this table took {time.perf_counter() - start:.0f} s"
    )
    print(table + footer)
    if args.out:
        args.out.write_text(table + "\n" + footer + "\n")


if __name__ == "__main__":
    main()
