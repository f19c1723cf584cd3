"""``vlmtune tour``: zero-shot vs one method per regime on shifted toy tasks."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlmtune.cli.common import Command, add_backbone_and_cache, add_exec_flags, exec_settings, progress


def add(command: Command) -> None:
    p = command("tour", help="zero-shot vs one method per regime on shifted toy tasks (offline, ~2 minutes)")
    add_backbone_and_cache(p)
    p.add_argument("--full", action="store_true", help="more tasks and methods, seeds 1-3, full budgets (longer)")
    p.add_argument("--out", default="runs/tour")
    add_exec_flags(p)
    p.set_defaults(fn=execute)


def execute(args: argparse.Namespace) -> int:
    from vlmtune.runs.runner import open_cache
    from vlmtune.runs.tour import FULL, QUICK, run_tour

    plan = FULL if args.full else QUICK
    cache = open_cache(args.cache_dir, not args.no_cache)
    out = Path(args.out)
    print(plan.intro, "\n", flush=True)
    table = run_tour(
        plan, backbone=args.backbone or "toy", cache=cache, progress=progress(args), out=out, **exec_settings(args)
    )
    print(table)
    print(f"\nwritten to {out}/results.md; next: `vlmtune list methods --options`, `vlmtune fit --help`")
    return 0
