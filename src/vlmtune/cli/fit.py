"""``vlmtune fit``: fit a method on a dataset and save the run directory."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from vlmtune.cli.common import (
    Command,
    add_backbone_and_cache,
    add_exec_flags,
    exec_given,
    parse_pairs,
    progress,
    read_config,
)
from vlmtune.errors import VlmtuneError

EXAMPLES = """Examples:
  vlmtune fit --method coop --dataset toy:shapes-sketch --shots 16
  vlmtune fit --method craft --dataset dtd --data-root ~/data --set preset=reference-dtd
  vlmtune fit --config run.toml --seed 2          # a config file (TOML / YAML / JSON); flags override it
  vlmtune fit --config runs/coop-toy_shapes-sketch-16shot-seed1/config.json --seed 2   # re-run a run
A config file holds RunConfig's keys (method, dataset, shots, options = {...}, device, ...; docs/configuration.md).
Each method's options: vlmtune list methods --options (--schema: as JSON schema)"""

# the RunConfig fields that have a flag of the same name (the execution ones come from ExecSettings)
RUN_FLAGS = (
    "method", "dataset", "backbone", "shots", "seed", "subsample", "query_budget", "curve_every", "service",
    "student", "unlabeled_fraction",
)  # fmt: skip


def add(command: Command) -> None:
    p = command(
        "fit",
        help="fit a method on a dataset and save the run directory",
        description=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_backbone_and_cache(p)
    p.add_argument("--method", default=None, help="registered method (vlmtune list methods)")
    p.add_argument("--dataset", default=None, help="dataset name, toy:<task> or folder:<path>")
    p.add_argument("--config", default=None, help="a config file (.toml, .yaml, .json or a run's config.json)")
    p.add_argument(
        "--shots",
        type=int,
        default=None,
        help="labelled images per class (default 16; 0 = all; label-free methods: default 0 = unsupervised, "
        "k = semi-supervised with k labelled per class)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the few-shot pick and the method (default 1)")
    p.add_argument("--subsample", choices=("all", "base", "new"), default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method option (repeatable)")
    p.add_argument("--preset", default=None, help="a method's named option set (e.g. craft: carrot, reference)")
    p.add_argument(
        "--out",
        default=None,
        help="run directory (default: runs/<method>-<dataset>-<k>shot-seed<s>[-<backbone>|-service])",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--query-budget", type=int, default=None, help="hard limit of the training black box")
    p.add_argument("--resume", action="store_true", help="continue the black-box run stopped in --out")
    p.add_argument(
        "--curve-every", type=int, default=None, help="black-box methods: test accuracy every N queries -> curve.png"
    )
    p.add_argument("--service", default=None, help="black-box methods: train through a vlmtune service at this URL")
    p.add_argument("--api-key", default=None, help="key for --service (default: $VLMTUNE_API_KEY)")
    p.add_argument(
        "--student", default=None, help="distillation (coft, coft_plus): the backbone fine-tuned; --backbone teaches"
    )
    p.add_argument(
        "--unlabeled-fraction",
        type=float,
        default=None,
        help="label-free methods: train on this share of the unlabelled images (a random subset; default 1)",
    )
    add_exec_flags(p)
    p.set_defaults(fn=execute)


def fit_config(args: argparse.Namespace) -> Any:
    """The RunConfig of a ``fit`` command line: defaults < the config file < the flags given."""
    from vlmtune.runs.runner import RunConfig

    base: dict[str, Any] = read_config(args.config) if args.config else {}
    given = {k: v for k in RUN_FLAGS if (v := getattr(args, k)) is not None}
    merged = {**base, **given, **exec_given(args)}
    options = base.get("options", {})
    if not isinstance(options, dict):
        raise VlmtuneError(f"--config {args.config}: options must be a table of method options")
    options = {**options, **parse_pairs(args.set)}
    if args.preset:
        options["preset"] = args.preset
    merged["options"] = options
    missing = [f"--{k}" for k in ("method", "dataset") if not merged.get(k)]
    if missing:
        raise VlmtuneError(f"fit needs {' and '.join(missing)} (or --config <run>/config.json); see `vlmtune list`")
    return RunConfig.from_json(merged)


def default_run_dir(cfg: Any) -> str:
    """runs/<method>-<dataset>-<k>shot-seed<s>, + -<backbone> where it is not the toy's and -service for a run
    against a service, so a local and a service run (or two backbones) never share a directory."""
    safe = str.maketrans({":": "_", "/": "_", "@": "_"})
    name = f"{cfg.method}-{cfg.dataset.translate(safe).strip('_')}-{cfg.shots}shot-seed{cfg.seed}"
    if cfg.service:
        name += "-service"
    elif cfg.backbone not in (None, "toy"):
        name += "-" + str(cfg.backbone).translate(safe).strip("_")
    return f"runs/{name}"


def execute(args: argparse.Namespace) -> int:
    from vlmtune.runs.runner import open_cache, run, with_shots

    cfg = with_shots(fit_config(args))
    out = Path(args.out or default_run_dir(cfg))
    result = run(
        cfg,
        out_dir=out,
        cache=open_cache(args.cache_dir, not args.no_cache),
        progress=progress(args),
        resume=args.resume,
        overwrite=args.overwrite,
        api_key=args.api_key or os.environ.get("VLMTUNE_API_KEY"),
    )
    from vlmtune.pixels.dist import is_main

    if not is_main():  # torchrun: rank 0 wrote the run directory and reports it
        return 0
    print((out / "results.md").read_text(), end="")
    if result.queries is not None:
        print(f"queries used: {result.queries}")
    print(f"run directory: {out}")
    return 0
