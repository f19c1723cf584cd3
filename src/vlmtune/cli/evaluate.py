"""``vlmtune eval``: score a saved run, or zero-shot a dataset or image folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vlmtune.cli.common import Command, add_backbone_and_cache, add_exec_flags, progress
from vlmtune.errors import VlmtuneError


def add(command: Command) -> None:
    p = command(
        "eval",
        help="score a saved run, or zero-shot a dataset or image folder",
        description="Examples:\n  vlmtune eval --run runs/coop-toy_shapes-sketch-16shot-seed1\n"
        "  vlmtune eval --dataset folder:~/my_images --backbone openclip:ViT-B-32@openai   # zero-shot\n"
        "Prints acc1, acc5 and mean per-class recall as JSON (--out writes them to a file).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_backbone_and_cache(p)
    add_exec_flags(p, ("device", "data_root", "skip_corrupt"))
    p.add_argument("--run", default=None, help="run directory or adapter folder (omit for zero-shot)")
    p.add_argument("--dataset", default=None, help="default: the run's dataset")
    p.add_argument("--split", default="test")
    p.add_argument("--subsample", choices=("all", "base", "new"), default="all")
    p.add_argument("--template", default=None, help="zero-shot: template (default: the dataset's)")
    p.add_argument("--ensemble", action="store_true", help="zero-shot: average the dataset's templates")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    p.set_defaults(fn=execute)


def load_run(folder: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from vlmtune.methods.registry import load_classifier

    adapter = folder / "adapter" if (folder / "adapter" / "adapter.json").is_file() else folder
    if not (adapter / "adapter.json").is_file():
        raise VlmtuneError(f"{folder} is neither a run directory nor an adapter folder (no adapter.json)")
    clf, meta = load_classifier(adapter)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    return clf, meta, config


def write_json(path: str, data: Any) -> None:
    from vlmtune._io import atomic_write

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))


def execute(args: argparse.Namespace) -> int:
    """Score a saved run; without --run, zero-shot evaluation of a dataset or image folder."""
    from vlmtune.backbones import load_backbone
    from vlmtune.data import base_new_split, load_dataset
    from vlmtune.data.templates import DEFAULT_TEMPLATE
    from vlmtune.methods.api import Task
    from vlmtune.methods.frozen.zeroshot import zero_shot_classifier
    from vlmtune.metrics import classification_metrics
    from vlmtune.runs.runner import FeatureSource, open_cache, split_logits, warn_if_toy_outside_its_world

    if args.run is None and args.dataset is None:
        raise VlmtuneError("eval needs --run (a saved run) or --dataset (zero-shot evaluation)")
    cache = open_cache(args.cache_dir, not args.no_cache)
    if args.run is not None:
        clf, meta, config = load_run(Path(args.run))
        spec = args.backbone or meta["backbone"]
        dataset = args.dataset or config.get("dataset") or meta.get("dataset")
        data_root = args.data_root or config.get("data_root")
    else:
        spec, dataset, data_root, config = args.backbone or "toy", args.dataset, args.data_root, {}
    if not dataset:
        raise VlmtuneError(f"{args.run}: the run names no dataset; give --dataset")
    warn_if_toy_outside_its_world(spec, dataset)
    backbone = load_backbone(spec, args.device or "cpu")
    splits = load_dataset(dataset, data_root, args.skip_corrupt)
    if args.split not in splits:
        raise VlmtuneError(f"{dataset} has no {args.split!r} split (it has: {', '.join(splits)})")
    split = base_new_split(splits[args.split], args.subsample)
    precision = config.get("feature_precision", "fp32")  # as the run was trained
    source = FeatureSource(backbone, cache, progress(args), precision=precision)
    out: dict[str, Any] = {"dataset": dataset, "split": split.split, "backbone": spec, "images": len(split)}
    if args.run is not None:
        if split.classnames != clf.classnames:
            clf = clf.for_classnames(split.classnames, backbone)
        out["run"] = args.run
        box_precision = config.get("box_precision", "fp32")
        out |= classification_metrics(
            *split_logits(clf, backbone, split, source, progress(args), box_precision=box_precision)
        )
    else:  # zero-shot with the dataset's template (or --template), and with CLIP's plain "a photo of a {}."
        task = Task(split.classnames, split.templates)
        templates = dict.fromkeys([args.template or "dataset", DEFAULT_TEMPLATE])
        out["zeroshot"] = {}
        for template in templates:
            zs = zero_shot_classifier(backbone, task, args.ensemble and template == "dataset", template)
            label = "ensemble" if args.ensemble and template == "dataset" else zs.templates[0]
            out["zeroshot"][label] = classification_metrics(*split_logits(zs, backbone, split, source, progress(args)))
    print(json.dumps(out))
    if args.out:
        write_json(args.out, out)
    return 0
