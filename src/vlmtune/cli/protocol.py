"""``vlmtune protocol``: the papers' evaluation protocols over several methods, seeds and settings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vlmtune.cli.common import (
    Command,
    add_backbone_and_cache,
    add_exec_flags,
    apply_config,
    exec_settings,
    json_or_text,
    method_options,
    parse_pairs,
    progress,
    read_config,
)
from vlmtune.errors import VlmtuneError

SUBPARSER: dict[str, argparse.ArgumentParser] = {}


def add(command: Command) -> None:
    p = command(
        "protocol",
        help="evaluation protocols: few-shot sweep, base-to-new, transfer (cross-dataset / domain generalisation), "
        "unsupervised, data-amount, semi-supervised, noisy-labels and distill (label-free methods)",
        description="Run methods under one of the papers' protocols and write JSON, CSV, a Markdown table of "
        "mean ± std over seeds (and, for few-shot, a plot of accuracy vs shots). Each finished job is kept in "
        "<out>/jobs.jsonl; --resume skips those. Examples:\n"
        "  vlmtune protocol few-shot --methods zeroshot coop tmm --dataset toy:shapes-sketch --jobs 2\n"
        "  vlmtune protocol base-to-new --methods coop cocoop tmm --dataset toy:shapes-sketch\n"
        "  vlmtune protocol transfer --methods coop tmm --dataset toy:toynet "
        "--targets toy:toynet-v2 toy:toynet-sketch\n"
        "  vlmtune protocol unsupervised --methods zeroshot upl grip --dataset toy:toynet-noisy-pool "
        "--set upl.n_ctx=8 --set grip.n_ctx=8\n"
        "  vlmtune protocol data-amount --methods zeroshot latteclip --dataset toy:toynet-sketch-pool "
        "--fractions 0.01 0.2 1\n"
        "  vlmtune protocol semi-supervised --methods upl grip --dataset toy:shapes-noisy-pool --shots 1 4 16\n"
        "  vlmtune protocol noisy-labels --methods linear_probe coft --dataset toy:toynet-noisy-pool "
        "--noise pairflip-0.4 --set coft.n_ctx=8\n"
        "  vlmtune protocol distill --methods coft --dataset toy:shapes-noisy-pool --teacher toy --student toy:small "
        "--set coft.n_ctx=8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "kind",
        nargs="?",
        default=None,
        choices=(
            "few-shot",
            "base-to-new",
            "transfer",
            "unsupervised",
            "data-amount",
            "semi-supervised",
            "noisy-labels",
            "distill",
        ),
    )
    add_backbone_and_cache(p)
    p.add_argument(
        "--config",
        default=None,
        help="a file (.toml / .yaml / .json) of these flags' values and options = {method = {...}}; flags override it",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="registered methods; LABEL=METHOD adds a variant with its own row and --set LABEL.KEY=VALUE options",
    )
    p.add_argument("--dataset", default=None, help="the dataset trained on (transfer: the source)")
    p.add_argument("--targets", nargs="+", default=[], help="transfer: datasets to test on")
    p.add_argument(
        "--noise",
        default="pairflip-0.4",
        help="noisy-labels: pairflip-R (class-dependent, R wrong), cifar100n or cifar100n:<CIFAR-100_human.pt>",
    )
    p.add_argument("--teacher", default=None, help="distill: the backbone of Phase I (default --backbone)")
    p.add_argument("--student", default=None, help="distill: the backbone Phase II fine-tunes")
    p.add_argument(
        "--shots",
        type=int,
        nargs="+",
        default=None,
        help="few-shot / semi-supervised: the sweep (default 1 2 4 8 16); unsupervised: none; others: one (16)",
    )
    p.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.01, 0.2, 1.0],
        help="data-amount: shares of the unlabelled images (paper 004 Fig. 6: 0.01 0.2 1)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE", help="method option (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side in worker processes")
    p.add_argument("--out", default=None, help="output folder (default: runs/<kind>-<dataset>)")
    p.add_argument("--resume", action="store_true", help="skip the jobs already in <out>/jobs.jsonl")
    p.add_argument(
        "--executor",
        choices=("slurm", "local", "debug"),
        default=None,
        help="run the jobs through submitit: slurm (a job array; logs in <out>/executor), local (--jobs subprocesses "
        "at a time) or debug (in this process); pip install 'vlmtune[cluster]'",
    )
    p.add_argument(
        "--executor-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="submitit parameter, e.g. timeout_min=120 slurm_partition=gpu gpus_per_node=1 (repeatable)",
    )
    add_exec_flags(p)
    p.set_defaults(fn=execute, config_hook=config_hook)
    SUBPARSER["protocol"] = p


def config_hook(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace) -> Any:
    """With ``--config``: the file's values become the protocol parser's defaults and the line is parsed again."""
    if not args.config:
        return args
    config = read_config(args.config)
    file_options = config.pop("options", {})
    if not isinstance(file_options, dict) or not all(isinstance(v, dict) for v in file_options.values()):
        raise VlmtuneError(f"--config {args.config}: options must map each method to a table of its options")
    apply_config(SUBPARSER["protocol"], config, args.config)
    again = parser.parse_args(argv)
    again.file_options = file_options
    return again


def options(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per-method options: the config file's, with ``--set METHOD.KEY=VALUE`` over them."""
    out = {m: dict(o) for m, o in getattr(args, "file_options", {}).items()}
    for method, given in method_options(args.set).items():
        out.setdefault(method, {}).update(given)
    return out


def execute(args: argparse.Namespace) -> int:
    from vlmtune.runs import protocols
    from vlmtune.runs.protocols import ProtocolSettings, base_to_new, few_shot_sweep, transfer
    from vlmtune.runs.runner import open_cache

    missing = [name for name, value in (("KIND", args.kind), ("--methods", args.methods), ("--dataset", args.dataset))
               if not value]  # fmt: skip
    if missing:
        raise VlmtuneError(f"protocol needs {', '.join(missing)} (on the command line or in --config)")
    sweep = args.kind in protocols.SWEEPS
    shots = args.shots or ([1, 2, 4, 8, 16] if sweep else [16])
    if args.kind in ("unsupervised", "data-amount", "noisy-labels", "distill") and args.shots:
        raise VlmtuneError(f"{args.kind} takes no --shots (semi-supervised: labelled shots + the rest unlabelled)")
    if args.kind == "distill" and not args.student:
        raise VlmtuneError(
            "distill needs --student (the backbone Phase II fine-tunes; --teacher or --backbone pseudo-labels)"
        )
    if not sweep and len(shots) != 1:
        raise VlmtuneError(f"{args.kind} takes one --shots value")
    if any(k < 1 for k in shots):
        raise VlmtuneError("--shots values must be >= 1")
    if args.kind == "transfer" and not args.targets:
        raise VlmtuneError("transfer needs --targets (datasets to test on)")
    folder = Path(args.out or f"runs/{args.kind}-{args.dataset.replace(':', '_')}")
    settings = ProtocolSettings(
        backbone=args.teacher or args.backbone or "toy",
        cache=open_cache(args.cache_dir, not args.no_cache),
        options=options(args),
        progress=progress(args),
        jobs=args.jobs,
        out=folder,
        resume=args.resume,
        executor=args.executor,
        executor_options={k: json_or_text(v) for k, v in parse_pairs(args.executor_set).items()},
        **exec_settings(args),
    )
    try:
        if args.kind == "few-shot":
            result = few_shot_sweep(args.methods, args.dataset, shots, args.seeds, settings)
        elif args.kind == "semi-supervised":
            result = protocols.semi_supervised(args.methods, args.dataset, shots, args.seeds, settings)
        elif args.kind == "unsupervised":
            result = protocols.unsupervised(args.methods, args.dataset, args.seeds, settings)
        elif args.kind == "data-amount":
            result = protocols.data_amount(args.methods, args.dataset, args.fractions, args.seeds, settings)
        elif args.kind == "noisy-labels":
            result = protocols.noisy_labels(args.methods, args.dataset, args.noise, args.seeds, settings)
        elif args.kind == "distill":
            teacher = args.teacher or args.backbone or "toy"
            result = protocols.distill(args.methods, args.dataset, teacher, args.student, args.seeds, settings)
        elif args.kind == "base-to-new":
            result = base_to_new(args.methods, args.dataset, shots[0], args.seeds, settings)
        else:
            result = transfer(args.methods, args.dataset, args.targets, shots[0], args.seeds, settings)
    except BaseException:
        if (folder / "jobs.jsonl").is_file():
            print(f"vlmtune: finished jobs are kept in {folder}/jobs.jsonl; add --resume to go on", file=sys.stderr)
        raise
    result.write(folder)
    print(result.markdown())
    print(f"\nwritten to {folder}/: " + ", ".join(sorted(p.name for p in folder.iterdir())))
    return 0
