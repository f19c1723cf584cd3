"""``vlmtune reproduce``: list the recipes, dry-run one (its jobs, what is missing, what it costs), or run it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vlmtune.cli.common import (
    Command,
    add_exec_flags,
    exec_settings,
    json_or_text,
    method_options,
    parse_pairs,
    progress,
)
from vlmtune.errors import VlmtuneError

EXAMPLES = """Examples:
  vlmtune reproduce --list
  vlmtune reproduce 001-table1 --data-root ~/data --backbone ViT-B/16 --dry-run
  vlmtune reproduce 001-table1 --data-root ~/data --backbone ViT-B/16 --device cuda --jobs 4
  vlmtune reproduce 002-table4 --backbone ViT-B/16=openclip:ViT-B-16@/weights/vitb16.pt --data-root ~/data
  vlmtune reproduce 004-table1 --data-root ~/data --textgen-backend openai --textgen-model llava --device cuda
  vlmtune reproduce 002-table4 --toy --seeds 1 --rows zeroshot coop --set coop.epochs=5   # the toy world, minutes
Results: <out>/results.md (ours / paper / difference per cell), results.csv, results.json, settings.json; each
group's finished jobs in <out>/jobs/ (a rerun of the same command resumes)."""


def add(command: Command) -> None:
    p = command(
        "reproduce",
        help="one command per table of the five papers: our numbers beside theirs (--list shows the recipes)",
        description="Run a paper table's grid (methods x datasets x backbones x shots x seeds) through the protocols "
        "and put our numbers beside the paper's.\n" + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", nargs="?", default=None, help="a recipe name (see --list)")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--cache-dir", default=None, help="feature cache (default: $VLMTUNE_CACHE or ~/.cache/vlmtune)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument(
        "--backbones",
        "--backbone",
        dest="backbones",
        nargs="+",
        default=[],
        metavar="LABEL[=SPEC]",
        help="the paper's backbones to run (default: all the table has); LABEL=SPEC loads SPEC for it",
    )
    p.add_argument("--rows", nargs="+", default=[], help="only these rows of the table")
    p.add_argument("--datasets", nargs="+", default=[], help="only these datasets (the paper's names)")
    p.add_argument("--seeds", type=int, nargs="+", default=[], help="default: the recipe's (1 2 3)")
    p.add_argument("--set", action="append", default=[], metavar="ROW.KEY=VALUE", help="row option (repeatable)")
    p.add_argument("--toy", action="store_true", help="on the toy world: toy tasks for the datasets, the toy model")
    p.add_argument("--dry-run", action="store_true", help="list the jobs, what is missing and the cost; run nothing")
    p.add_argument("--timings", nargs="+", default=[], help="--dry-run: earlier --out folders to price jobs from")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side in worker processes")
    p.add_argument("--out", default=None, help="output folder (default: runs/reproduce/<recipe>[-toy])")
    p.add_argument(
        "--executor",
        choices=("slurm", "local", "debug"),
        default=None,
        help="run each group's jobs through submitit (as vlmtune protocol --executor)",
    )
    p.add_argument("--executor-set", action="append", default=[], metavar="KEY=VALUE", help="submitit parameter")
    add_exec_flags(p)
    p.set_defaults(fn=execute)


def _list() -> int:
    from vlmtune.reproduce import RECIPES, unavailable_rows

    for name, r in RECIPES.items():
        missing = unavailable_rows(r)
        twins = [t.name for t in RECIPES.values() if t is not r and t.paper.cells == r.paper.cells]
        rows = ", ".join(x.label for x in r.rows if x.method is not None)
        shots = "/".join(map(str, r.shots)) if r.shots != (0,) else "unlabelled"
        print(f"{name}  {r.title}")
        print(f"    protocol {r.protocol}; shots {shots}; seeds {' '.join(map(str, r.seeds))}")
        print(f"    backbones: {', '.join(r.backbones)}")
        print(f"    datasets: {', '.join(r.dataset_columns())}")
        print(f"    rows: {rows}")
        if twins:  # CARROT (000) is the earlier version of CraFT (001): its tables were published again
            why = f"; {r.note}" if r.note else ""
            print(f"    the same published numbers as {', '.join(twins)} (one table, in both papers{why})")
        if missing:
            print(f"    not in vlmtune yet: {', '.join(x.label for x in missing)}")
    return 0


def _fmt_hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def execute(args: argparse.Namespace) -> int:
    from vlmtune.reproduce import (
        RunSettings,
        Selection,
        estimate,
        execute,
        get_recipe,
        measured_times,
        plan,
        unavailable_rows,
        write,
    )
    from vlmtune.reproduce.plan import DatasetCheck, backbone_missing, data_missing
    from vlmtune.runs.runner import open_cache

    if args.list:
        return _list()
    if not args.recipe:
        raise VlmtuneError("name a recipe (vlmtune reproduce --list shows them)")
    recipe = get_recipe(args.recipe)
    sel = Selection(args.backbones, args.rows, args.datasets, args.seeds, args.toy)
    groups = plan(recipe, sel)
    options = method_options(args.set)
    unknown = sorted(set(options) - {r.label for r in recipe.rows})
    if unknown:
        raise VlmtuneError(f"--set names rows {recipe.name} does not have: {', '.join(unknown)}")
    out = Path(args.out or f"runs/reproduce/{recipe.name}{'-toy' if args.toy else ''}")
    exec_ = exec_settings(args)
    checks = DatasetCheck(exec_["data_root"])
    textgen = exec_["textgen"]
    # each backbone and each group's data checked once (weights lookups and dataset listings are not free)
    backbones = {s: backbone_missing(s) for g in groups for s in (g.spec, g.student) if s}
    data = {g.slug: data_missing(g, checks, textgen) for g in groups}
    lacking = {g.slug: [m for m in (backbones[g.spec], g.student and backbones[g.student]) if m] + data[g.slug]
               for g in groups}  # fmt: skip
    skipped = [x.label for x in unavailable_rows(recipe) if not args.rows or x.label in args.rows]

    print(f"{recipe.name}: {recipe.title}")
    if skipped:
        print(f"  rows not in vlmtune yet (left out): {', '.join(skipped)}")
    if args.dry_run:
        for spec, problem in backbones.items():
            print(f"  backbone {spec}: {problem or 'ready'}")
        for g in groups:
            where = g.run_dataset + (f" -> {', '.join(t for _, t in g.targets)}" if g.targets else "")
            spec = g.spec + (f" -> {g.student}" if g.student else "")
            rows = ", ".join(r.label for r in g.rows)
            shots = "/".join(map(str, g.shots))
            status = "; ".join(data[g.slug]) or "ready"
            print(f"  [{g.backbone} = {spec}] {g.protocol} {where}, shots {shots}: {rows} x seeds "
                  f"{' '.join(map(str, g.seeds))} ({g.runs} runs): {status}")  # fmt: skip
        times = measured_times([out, *map(Path, args.timings)])
        seconds, priced, unknown_runs = estimate(groups, times)
        runs = sum(g.runs for g in groups)
        ready = sum(g.runs for g in groups if not lacking[g.slug])
        cost = f"{_fmt_hours(seconds)} for the {priced} runs with a measured time" if priced else "no measured times"
        print(
            f"  {runs} runs, {ready} ready; estimated {cost}" + (f"; {unknown_runs} unmeasured" if unknown_runs else "")
        )
        if unknown_runs:
            sample = groups[0]
            print(
                f"  to price them: run one seed of one dataset first (--seeds {sample.seeds[0]} --datasets "
                f"{sample.run_dataset}); --dry-run then prices each row from its measured time ({out}/**/jobs.jsonl, "
                "or --timings DIR of an earlier reproduce)"
            )
        return 0
    blocked = {slug: m for slug, m in lacking.items() if m}
    if blocked:
        first = next(iter(blocked.values()))
        raise VlmtuneError(f"{len(blocked)} of {len(groups)} groups cannot run: {first[0]} (see --dry-run)")
    settings = RunSettings(
        out=out,
        cache=open_cache(args.cache_dir, not args.no_cache),
        options=options,
        jobs=args.jobs,
        progress=progress(args),
        toy=args.toy,
        executor=args.executor,
        executor_options={k: json_or_text(v) for k, v in parse_pairs(args.executor_set).items()},
        **exec_,
    )

    def announce(i: int, g: Any) -> None:
        if settings.progress:
            print(f"  group {i + 1}/{len(groups)}: {g.backbone} {g.protocol} {g.dataset}", flush=True)

    rep = execute(recipe, groups, settings, announce)
    folder = write(rep, groups, settings)
    print(rep.markdown())
    print(f"written to {folder}/: results.md, results.csv, results.json, settings.json")
    return 1 if rep.failed else 0
