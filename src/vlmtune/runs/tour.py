"""``vlmtune tour``: what vlmtune is for, in about two minutes on two CPU cores.

Zero-shot (with the dataset's template and with CLIP's plain "a photo of a {}.") against one method per regime on
shifted toy tasks: a white-box prompt learner (CoOp), a black-box method that sees only predictions (CraFT), and
a linear probe on frozen features. ``--full`` runs more tasks and methods at the papers' budgets over seeds 1-3.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune._io import atomic_write
from vlmtune.data import load_dataset
from vlmtune.data.templates import DEFAULT_TEMPLATE
from vlmtune.features import FeatureCache
from vlmtune.runs.report import fmt_mean_std, markdown_table
from vlmtune.runs.runner import RunConfig, run


@dataclass(frozen=True)
class TourPlan:
    intro: str
    tasks: tuple[tuple[str, str], ...]  # (task, what is shifted)
    columns: tuple[tuple[str, str, dict[str, Any]], ...]  # (column, method, options)
    seeds: tuple[int, ...]
    shots: int = 16


ZERO_SHOT: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("zero-shot, dataset template", "zeroshot", {}),
    (f'zero-shot, "{DEFAULT_TEMPLATE}"', "zeroshot", {"template": DEFAULT_TEMPLATE}),
)
QUICK = TourPlan(
    "vlmtune tour: zero-shot vs one method per regime on shifted toy tasks (16 shots, seed 1; about 2 minutes)",
    (
        ("toy:toynet-sketch", "sketches, captioned in another vocabulary"),
        ("toy:nonce-shapes", "made-up class names"),
        ("toy:toynet-pixel", "pixel art: the shift is in the images"),
    ),
    (
        *ZERO_SHOT,
        ("linear probe (features)", "linear_probe", {}),
        ("CoOp (white box)", "coop", {"n_ctx": 4, "ctx_init": "a photo of a"}),
        ("CraFT (black box, 2,050 queries)", "craft", {"budget": 2050}),
    ),
    (1,),
)
FULL = TourPlan(
    "vlmtune tour --full: more tasks and methods, the papers' budgets, mean ± std over seeds 1-3",
    (
        *QUICK.tasks,
        ("toy:shapes-sketch", "sketches, captioned in another vocabulary"),
        ("toy:toynet-noisy", "sensor noise"),
        ("toy:colour-shapes", "fine-grained: 48 colour x shape classes"),
    ),
    (
        *ZERO_SHOT,
        ("linear probe", "linear_probe", {}),
        ("Tip-Adapter-F", "tip_adapter_f", {}),
        ("CoOp", "coop", {"n_ctx": 4, "ctx_init": "a photo of a"}),
        ("TMM", "tmm", {"batch_size": 8}),
        ("BBT (black box)", "bbt", {}),
        ("CraFT (black box)", "craft", {}),
    ),
    (1, 2, 3),
)


def run_tour(
    plan: TourPlan, backbone: str, cache: FeatureCache | None, progress: bool, out: Path, **settings: Any
) -> str:
    """Run the plan, write ``results.md`` / ``results.json`` into ``out``, return the Markdown table.

    ``settings``: ``ExecSettings`` fields (device, data_root, precisions, ...) for every run.
    """
    rows, records = [], []
    for task, shift in plan.tasks:
        splits = load_dataset(task)
        cells = []
        for _, method, options in plan.columns:
            accs = []
            seeds = plan.seeds if method != "zeroshot" else plan.seeds[:1]  # zero-shot has no randomness
            for seed in seeds:
                cfg = RunConfig(
                    method=method,
                    dataset=task,
                    backbone=backbone,
                    shots=plan.shots,
                    seed=seed,
                    options=options,
                    **settings,
                )
                res = run(cfg, cache=cache, progress=progress, splits=splits)
                accs.append(res.accuracy["test"])
                records.append(res.to_json())
            cells.append(fmt_mean_std(accs) if len(accs) > 1 else f"{statistics.mean(accs):.1f}")
        rows.append([task, shift, *cells])
    table = markdown_table(["task", "shift", *(c for c, _, _ in plan.columns)], rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(plan.intro + "\n\n" + table + "\n"))
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1)))
    return table
