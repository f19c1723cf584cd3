"""The ``vlmtune`` command line: tour, fit, eval, predict, protocol, reproduce, serve, textgen, textgen-serve, list.

Ordinary mistakes end in one line on stderr and exit code 2 (``-v`` adds the traceback); Ctrl-C prints one
line and exits 130.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from vlmtune import __version__
from vlmtune.blackbox.api import BudgetExceeded
from vlmtune.errors import VlmtuneError

log = logging.getLogger("vlmtune")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
USER_ERRORS = (VlmtuneError, ValueError, NotImplementedError, OSError, LookupError, BudgetExceeded)


def _options(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise VlmtuneError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _json_or_text(value: str) -> Any:
    """``120`` -> 120, ``true`` -> True, ``gpu`` -> "gpu" (values of engine parameters)."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _common(p: argparse.ArgumentParser, cache: bool = True) -> None:
    p.add_argument("--backbone", default=None, help="backbone spec (default: toy; see `vlmtune list backbones`)")
    p.add_argument("--data-root", default=None, help="folder with the real datasets (default: $VLMTUNE_DATA or ./data)")
    if cache:
        p.add_argument("--cache-dir", default=None, help="feature cache (default: $VLMTUNE_CACHE or ~/.cache/vlmtune)")
        p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images (logged) instead of failing")


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


# ---- tour ----------------------------------------------------------------------------------------------------
def cmd_tour(args: argparse.Namespace) -> int:
    from vlmtune.runs.runner import open_cache
    from vlmtune.runs.tour import FULL, QUICK, run_tour

    plan = FULL if args.full else QUICK
    cache = open_cache(args.cache_dir, not args.no_cache)
    out = Path(args.out)
    print(plan.intro, "\n", flush=True)
    table = run_tour(plan, backbone=args.backbone or "toy", cache=cache, progress=_progress(args), out=out)
    print(table)
    print(f"\nwritten to {out}/results.md; next: `vlmtune list methods --options`, `vlmtune fit --help`")
    return 0


# ---- fit -----------------------------------------------------------------------------------------------------
def _fit_config(args: argparse.Namespace) -> Any:
    from vlmtune.runs.runner import RunConfig

    base: dict[str, Any] = {}
    if args.config:
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise VlmtuneError(f"cannot read --config {args.config}: {exc}") from None
    given = {
        "method": args.method,
        "dataset": args.dataset,
        "backbone": args.backbone,
        "shots": args.shots,
        "seed": args.seed,
        "subsample": args.subsample,
        "data_root": args.data_root,
        "device": args.device,
        "query_budget": args.query_budget,
        "curve_every": args.curve_every,
        "service": args.service,
        "student": args.student,
        "textgen": args.textgen,
        "textgen_model": args.textgen_model,
        "textgen_endpoint": args.textgen_endpoint,
        "unlabeled_fraction": args.unlabeled_fraction,
        "box_precision": args.box_precision,
        "feature_precision": args.feature_precision,
    }
    merged = {**base, **{k: v for k, v in given.items() if v is not None}}
    merged["skip_corrupt"] = args.skip_corrupt or bool(base.get("skip_corrupt", False))
    options = {**base.get("options", {}), **_options(args.set)}
    if args.preset:
        options["preset"] = args.preset
    merged["options"] = options
    missing = [f"--{k}" for k in ("method", "dataset") if not merged.get(k)]
    if missing:
        raise VlmtuneError(f"fit needs {' and '.join(missing)} (or --config <run>/config.json); see `vlmtune list`")
    return RunConfig.from_json(merged)


def cmd_fit(args: argparse.Namespace) -> int:
    from vlmtune.runs.runner import open_cache, run, with_shots

    cfg = with_shots(_fit_config(args))
    name = cfg.dataset.replace(":", "_").replace("/", "_").strip("_")
    out = Path(args.out or f"runs/{cfg.method}-{name}-{cfg.shots}shot-seed{cfg.seed}")
    result = run(
        cfg,
        out_dir=out,
        cache=open_cache(args.cache_dir, not args.no_cache),
        progress=_progress(args),
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


# ---- eval ----------------------------------------------------------------------------------------------------
def _load_run(folder: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from vlmtune.methods.registry import load_classifier

    adapter = folder / "adapter" if (folder / "adapter" / "adapter.json").is_file() else folder
    if not (adapter / "adapter.json").is_file():
        raise VlmtuneError(f"{folder} is neither a run directory nor an adapter folder (no adapter.json)")
    clf, meta = load_classifier(adapter)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    return clf, meta, config


def _write_json(path: str, data: Any) -> None:
    from vlmtune._io import atomic_write

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a saved run; without --run, zero-shot evaluation of a dataset or image folder."""
    from vlmtune.backbones import load_backbone
    from vlmtune.data import base_new_split, load_dataset
    from vlmtune.data.templates import DEFAULT_TEMPLATE
    from vlmtune.methods.api import Task
    from vlmtune.methods.frozen.zeroshot import zero_shot_classifier
    from vlmtune.metrics import classification_metrics
    from vlmtune.runs.runner import FeatureSource, open_cache, split_logits

    if args.run is None and args.dataset is None:
        raise VlmtuneError("eval needs --run (a saved run) or --dataset (zero-shot evaluation)")
    cache = open_cache(args.cache_dir, not args.no_cache)
    if args.run is not None:
        clf, meta, config = _load_run(Path(args.run))
        spec = args.backbone or meta["backbone"]
        dataset = args.dataset or config.get("dataset") or meta.get("dataset")
        data_root = args.data_root or config.get("data_root")
    else:
        spec, dataset, data_root, config = args.backbone or "toy", args.dataset, args.data_root, {}
    backbone = load_backbone(spec, args.device or "cpu")
    splits = load_dataset(dataset, data_root, args.skip_corrupt)
    if args.split not in splits:
        raise VlmtuneError(f"{dataset} has no {args.split!r} split (it has: {', '.join(splits)})")
    split = base_new_split(splits[args.split], args.subsample)
    precision = config.get("feature_precision", "fp32")  # as the run was trained
    source = FeatureSource(backbone, cache, _progress(args), precision=precision)
    out: dict[str, Any] = {"dataset": dataset, "split": split.split, "backbone": spec, "images": len(split)}
    if args.run is not None:
        if split.classnames != clf.classnames:
            clf = clf.for_classnames(split.classnames, backbone)
        out["run"] = args.run
        box_precision = config.get("box_precision", "fp32")
        out |= classification_metrics(
            *split_logits(clf, backbone, split, source, _progress(args), box_precision=box_precision)
        )
    else:  # zero-shot with the dataset's template (or --template), and with CLIP's plain "a photo of a {}."
        task = Task(split.classnames, split.templates)
        templates = dict.fromkeys([args.template or "dataset", DEFAULT_TEMPLATE])
        out["zeroshot"] = {}
        for template in templates:
            zs = zero_shot_classifier(backbone, task, args.ensemble and template == "dataset", template)
            label = "ensemble" if args.ensemble and template == "dataset" else zs.templates[0]
            out["zeroshot"][label] = classification_metrics(*split_logits(zs, backbone, split, source, _progress(args)))
    print(json.dumps(out))
    if args.out:
        _write_json(args.out, out)
    return 0


# ---- predict -------------------------------------------------------------------------------------------------
def _collect_images(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise VlmtuneError(f"no such image or folder: {p}")
    if not files:
        raise VlmtuneError(f"no images found in {', '.join(paths)}")
    return files


def cmd_predict(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from vlmtune.backbones import load_backbone
    from vlmtune.data.base import open_image
    from vlmtune.errors import CorruptImage

    clf, meta, config = _load_run(Path(args.run))
    files = _collect_images(args.images)
    box, backbone = None, None
    if hasattr(clf, "predict_blackbox"):
        from vlmtune.blackbox.api import ImageRefs, upload_bytes

        service = args.service or meta.get("service")
        if service:  # the adapter's prompt and head, the service's model
            from vlmtune.blackbox.client import HttpBlackBox

            box = HttpBlackBox(service, args.api_key or os.environ.get("VLMTUNE_API_KEY", ""))
        else:
            from vlmtune.blackbox.local import LocalBlackBox

            precision = config.get("box_precision", "fp32")  # the box the adapter was trained against
            box = LocalBlackBox(load_backbone(meta["backbone"], args.device), precision=precision, **clf.box_options())
        from vlmtune.runs.runner import bind_client_encoder

        bind_client_encoder(clf, args.device)
    else:
        backbone = load_backbone(meta["backbone"], args.device)
        if args.classnames:
            clf = clf.for_classnames([c.strip() for c in args.classnames.split(",") if c.strip()], backbone)
    k = min(args.top_k, len(clf.classnames))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "prediction", "confidence"] + [f"top{i + 1}" for i in range(1, k)])
    skipped = 0
    for start in tqdm(range(0, len(files), 64), desc="predicting", unit="batch", disable=not _progress(args)):
        batch, images = [], []
        for f in files[start : start + 64]:
            try:
                images.append(open_image(f))
                batch.append(f)
            except CorruptImage as exc:
                if not args.skip_corrupt:
                    raise VlmtuneError(f"{exc} (--skip-corrupt skips such files); nothing was written") from None
                log.warning("skipping unreadable image: %s", exc)
                skipped += 1
        if not batch:
            continue
        if box is not None:  # the files' own bytes where the service accepts the format, else PNG
            data = [upload_bytes(f, lambda im=im: im) for f, im in zip(batch, images, strict=True)]
            ids = box.upload(data)
            logits = clf.predict_blackbox(box, ImageRefs(ids, torch.zeros(len(ids), dtype=torch.long), images))
        else:
            prep = clf.image_encoder(backbone).preprocess  # the encoder's own (an LMM pads to its square)
            logits = clf.predict_images(backbone, torch.stack([prep(im) for im in images]))
        conf, idx = logits.softmax(-1).topk(k, dim=-1)  # (B, k)
        for f, c, i in zip(batch, conf.tolist(), idx.tolist(), strict=True):
            writer.writerow([str(f), clf.classnames[i[0]], f"{c[0]:.4f}"] + [clf.classnames[j] for j in i[1:]])
    if args.out == "-":
        sys.stdout.write(buffer.getvalue())
    else:
        from vlmtune._io import atomic_write

        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(buffer.getvalue()))  # all or nothing
        print(
            f"{len(files) - skipped} predictions written to {args.out}" + (f" ({skipped} skipped)" if skipped else "")
        )
    return 0


# ---- protocol ------------------------------------------------------------------------------------------------
def _method_options(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``METHOD.KEY=VALUE`` pairs -> {method: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in _options(pairs).items():
        method, dot, name = key.partition(".")
        if not dot or not method or not name:
            raise VlmtuneError(f"--set expects METHOD.KEY=VALUE (e.g. coop.epochs=50), got {key!r}")
        out.setdefault(method, {})[name] = value
    return out


def cmd_protocol(args: argparse.Namespace) -> int:
    from vlmtune.runs import protocols
    from vlmtune.runs.protocols import ProtocolSettings, base_to_new, few_shot_sweep, transfer
    from vlmtune.runs.runner import open_cache

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
        options=_method_options(args.set),
        progress=_progress(args),
        jobs=args.jobs,
        device=args.device or "cpu",
        data_root=args.data_root,
        skip_corrupt=args.skip_corrupt,
        out=folder,
        resume=args.resume,
        box_precision=args.box_precision or "fp32",
        feature_precision=args.feature_precision or "fp32",
        executor=args.executor,
        executor_options={k: _json_or_text(v) for k, v in _options(args.executor_set).items()},
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


# ---- list ----------------------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    from vlmtune.backbones import EXAMPLE_SPECS
    from vlmtune.data import list_datasets
    from vlmtune.methods.options import describe
    from vlmtune.methods.registry import list_methods

    what = args.what
    if what in ("all", "methods"):
        print("methods:")
        for m in list_methods():
            print(f"  {m.name:<16} [{m.capability.value}] {m.summary}")
            if args.options:
                for o in describe(m.config_cls):
                    limits = f" ({o.constraints})" if o.constraints else ""
                    print(f"      {o.name:<14} {o.type:<28} default {o.default!r}{limits}: {o.doc}")
                if m.presets:
                    print(f"      presets (--set preset=NAME): {', '.join(m.presets)}")
        if not args.options:
            print("  (each method's options: vlmtune list methods --options)")
    if what in ("all", "datasets"):
        print("datasets:")
        for d in list_datasets():
            print(f"  {d.name:<20} {d.description}")
        print("  folder:<path>        any <root>/<class>/<image> folder")
    if what in ("all", "backbones"):
        print("backbones (spec grammar: toy | openclip:<arch>[@<tag or file>] | hf:<repo or folder> | local:<folder>):")
        for spec in EXAMPLE_SPECS:
            print(f"  {spec}")
    if what in ("all", "textgen"):
        print("text-generation backends (vlmtune textgen --backend B --model M; docs/textgen.md):")
        print("  toy            the bundled toy describer (offline, default)")
        print("  openai         any OpenAI-compatible endpoint (--endpoint URL): vLLM, ollama, llama.cpp, hosted APIs")
        print("  transformers   a local LLaVA-style image-text-to-text model or text LLM (hub id or folder)")
    return 0


# ---- serve ---------------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from vlmtune.errors import require

    require("fastapi", "serve", "vlmtune serve")
    uvicorn = require("uvicorn", "serve", "vlmtune serve")
    from vlmtune.backbones import load_backbone
    from vlmtune.blackbox.accounts import UsageStore, generate_keys, load_keys, state_paths
    from vlmtune.blackbox.api import ServiceLimits
    from vlmtune.blackbox.local import LocalBlackBox
    from vlmtune.blackbox.server import create_app, server_config

    keys_file, db = state_paths(args.state)
    if args.keys is not None:
        keys = load_keys(args.keys)
    else:
        keys = generate_keys(keys_file, args.budget)
        print(f"API key in {keys_file} (readable by you only): {len(keys)} key(s)", flush=True)
    limits = ServiceLimits(
        max_images=args.max_images, max_classes=args.max_classes, max_reply_values=args.max_reply_mb * 2**20 // 4
    )
    box = LocalBlackBox(
        load_backbone(args.backbone, args.device),
        name=args.name,
        visual_prompts=args.visual_prompts,
        pixel_prompts=args.pixel_prompts,
        limits=limits,
        precision=args.precision,
    )
    app = create_app(box, keys, UsageStore(db), args.max_body_mb * 2**20)
    print(f"serving {args.backbone} on http://{args.host}:{args.port} (docs at /docs; usage in {db})", flush=True)
    uvicorn.Server(server_config(app, args.host, args.port)).run()
    return 0


def _precision_arg(p: argparse.ArgumentParser, flag: str, what: str, default: str | None = None) -> None:
    p.add_argument(
        flag,
        choices=("fp32", "bf16", "auto"),
        default=default,
        help=f"weights of {what}: fp32 (default), bf16 (a bfloat16 copy: 2.5-5x faster on AMX CPUs) or auto (bf16 "
        "where the device has bf16 matrix units)",
    )


def _precision_args(p: argparse.ArgumentParser) -> None:
    _precision_arg(p, "--box-precision", "the local black box of black-box methods (docs/performance.md)")
    _precision_arg(p, "--feature-precision", "the image tower that extracts features")


# ---- textgen -------------------------------------------------------------------------------------------------
def _textgen_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(
        f"--{prefix}backend" if prefix else "--backend",
        dest="textgen",
        default=None,
        help="text generation: toy (bundled, offline; default), openai (an OpenAI-compatible endpoint) "
        "or transformers (a local LLaVA-style model)",
    )
    p.add_argument(
        f"--{prefix}model",
        dest="textgen_model",
        default=None,
        help="the generator's model (openai: the served model name; transformers: hub id or folder)",
    )
    p.add_argument(
        f"--{prefix}endpoint",
        dest="textgen_endpoint",
        default=None,
        help="openai backend: base URL (default $VLMTUNE_TEXTGEN_ENDPOINT or http://localhost:8000/v1; "
        "API key from $VLMTUNE_TEXTGEN_API_KEY or $OPENAI_API_KEY)",
    )


def cmd_textgen(args: argparse.Namespace) -> int:
    from vlmtune.runs.runner import open_cache
    from vlmtune.runs.textgen import pregenerate, text_cache_for
    from vlmtune.textgen import GenSettings, TextStage

    settings = GenSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    options: dict[str, Any] = {}
    if args.quantize:
        options["quantize"] = args.quantize
    if args.concurrency:
        options["concurrency"] = args.concurrency
    device = args.device or "cpu"
    feature_cache = open_cache(args.cache_dir, not args.no_cache)
    stage = TextStage(
        args.textgen or "toy",
        args.textgen_model,
        text_cache_for(feature_cache),
        settings,
        endpoint=args.textgen_endpoint,
        device=device,
        options=options,
        progress=_progress(args),
    )
    overrides = {args.kind: args.prompt} if args.prompt else {}
    summary = pregenerate(
        stage,
        args.dataset,
        args.kind,
        args.split,
        args.data_root,
        args.backbone or "toy",
        device,
        args.prompts,
        overrides,
        args.n,
        args.group_size,
        args.limit,
        feature_cache,
    )
    print(summary.line())
    return 0


def cmd_textgen_serve(args: argparse.Namespace) -> int:
    from vlmtune.errors import require

    require("fastapi", "serve", "vlmtune textgen-serve")
    uvicorn = require("uvicorn", "serve", "vlmtune textgen-serve")
    from vlmtune.textgen import load_generator
    from vlmtune.textgen.serve import chat_app

    generator = load_generator(args.textgen or "toy", args.textgen_model, device=args.device)
    print(f"serving {generator.name}:{generator.model} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(chat_app(generator), host=args.host, port=args.port, log_level="warning")
    return 0


# ---- parser --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    verbosity = argparse.ArgumentParser(add_help=False)
    verbosity.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log details")
    verbosity.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    ap = argparse.ArgumentParser(
        prog="vlmtune", description="Adapt CLIP-style vision-language models to your task.", parents=[verbosity]
    )
    ap.add_argument("--version", action="version", version=f"vlmtune {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def command(name: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[verbosity], **kw)

    p = command("tour", help="zero-shot vs one method per regime on shifted toy tasks (offline, ~2 minutes)")
    _common(p)
    p.add_argument("--full", action="store_true", help="more tasks and methods, seeds 1-3, full budgets (longer)")
    p.add_argument("--out", default="runs/tour")
    p.set_defaults(fn=cmd_tour)

    p = command(
        "fit",
        help="fit a method on a dataset and save the run directory",
        description="Examples:\n  vlmtune fit --method coop --dataset toy:shapes-sketch --shots 16\n"
        "  vlmtune fit --method craft --dataset dtd --data-root ~/data --set preset=reference-dtd\n"
        "  vlmtune fit --config runs/coop-toy_shapes-sketch-16shot-seed1/config.json --seed 2\n"
        "Each method's options: vlmtune list methods --options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.add_argument("--method", default=None, help="registered method (vlmtune list methods)")
    p.add_argument("--dataset", default=None, help="dataset name, toy:<task> or folder:<path>")
    p.add_argument("--config", default=None, help="re-run a run: its config.json (other flags override it)")
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
    p.add_argument("--out", default=None, help="run directory (default: runs/<method>-<dataset>-<k>shot-seed<s>)")
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
    _precision_args(p)
    _textgen_args(p, "textgen-")
    p.set_defaults(fn=cmd_fit)

    p = command(
        "eval",
        help="score a saved run, or zero-shot a dataset or image folder",
        description="Examples:\n  vlmtune eval --run runs/coop-toy_shapes-sketch-16shot-seed1\n"
        "  vlmtune eval --dataset folder:~/my_images --backbone openclip:ViT-B-32@openai   # zero-shot\n"
        "Prints acc1, acc5 and mean per-class recall as JSON (--out writes them to a file).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.add_argument("--run", default=None, help="run directory or adapter folder (omit for zero-shot)")
    p.add_argument("--dataset", default=None, help="default: the run's dataset")
    p.add_argument("--split", default="test")
    p.add_argument("--subsample", choices=("all", "base", "new"), default="all")
    p.add_argument("--template", default=None, help="zero-shot: template (default: the dataset's)")
    p.add_argument("--ensemble", action="store_true", help="zero-shot: average the dataset's templates")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    p.set_defaults(fn=cmd_eval)

    p = command("predict", help="predict classes of image files or folders -> CSV")
    p.add_argument("--run", required=True, help="run directory or adapter folder")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", default="predictions.csv", help="CSV path (written only when all went well), '-': stdout")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--classnames", default=None, help="comma-separated class names (methods that allow new names)")
    p.add_argument("--service", default=None, help="black-box adapters: URL of a vlmtune service to query")
    p.add_argument("--api-key", default=None, help="key for --service (default: $VLMTUNE_API_KEY)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images (logged) instead of failing")
    p.set_defaults(fn=cmd_predict)

    p = command("serve", help="serve a backbone as a black-box VLM over HTTP (predictions only)")
    p.add_argument("--backbone", default="toy")
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--keys", default=None, help='keys file {"<key>": budget | null | {"queries", "work", "images"}}')
    p.add_argument("--state", default="vlmtune-service", help="folder of the usage database and generated keys")
    p.add_argument("--budget", type=int, default=8000, help="query budget of the generated key (without --keys)")
    p.add_argument("--name", default=None, help="public model name (default: the backbone spec)")
    p.add_argument("--max-body-mb", type=int, default=32)
    p.add_argument("--max-reply-mb", type=int, default=256, help="largest reply (binary float32)")
    p.add_argument("--max-classes", type=int, default=2000, help="class names per request")
    p.add_argument("--max-images", type=int, default=20000, help="image ids per request")
    p.add_argument(
        "--visual-prompts",
        action="store_true",
        help="also accept visual prompt tokens (ViT backbones; keeps uploaded pixels in memory, ~0.6 MB/image)",
    )
    p.add_argument(
        "--pixel-prompts",
        action="store_true",
        help="also accept per-image pixel prompts (BlackVIP; any backbone; keeps uploaded pixels in memory)",
    )
    _precision_arg(p, "--precision", "the served model", default="fp32")
    p.set_defaults(fn=cmd_serve)

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
    _common(p)
    p.add_argument(
        "--methods",
        nargs="+",
        required=True,
        help="registered methods; LABEL=METHOD adds a variant with its own row and --set LABEL.KEY=VALUE options",
    )
    p.add_argument("--dataset", required=True, help="the dataset trained on (transfer: the source)")
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
    _precision_args(p)
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
    p.set_defaults(fn=cmd_protocol)

    p = command(
        "textgen",
        help="pre-generate LLM / LMM texts for a dataset into the text cache (methods read them from there)",
        description="Examples:\n  vlmtune textgen --dataset toy:shapes-noisy-pool --kind image\n"
        "  vlmtune textgen --dataset dtd --data-root ~/data --kind group --backend transformers "
        "--model llava-hf/llava-v1.6-mistral-7b-hf --device cuda --quantize 4bit\n"
        "  vlmtune textgen --dataset caltech101 --kind image --backend openai --model llava "
        "--endpoint http://gpu-box:8000/v1\n"
        "Texts land in <cache-dir>/textgen/texts.sqlite (+ a JSONL copy); copy that folder to share them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--kind", required=True, choices=("image", "group", "class", "templates"))
    _textgen_args(p)
    p.add_argument("--split", default="train", help="the images described (default: train)")
    p.add_argument("--prompts", default="paper", choices=("paper", "reference"), help="the papers' or the code's")
    p.add_argument("--prompt", default=None, help="your own prompt for this kind (placeholders: docs/textgen.md)")
    p.add_argument("--n", type=int, default=8, help="class: sentences per class; templates: how many")
    p.add_argument("--group-size", type=int, default=4, help="group: images per collage (LatteCLIP: 4)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (a quick look)")
    p.add_argument("--max-new-tokens", type=int, default=77)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the papers')")
    p.add_argument("--quantize", default=None, choices=("4bit",), help="transformers: 4-bit weights (bitsandbytes)")
    p.add_argument("--concurrency", type=int, default=None, help="openai: requests in flight (default 8)")
    p.set_defaults(fn=cmd_textgen)

    p = command("textgen-serve", help="serve a text generator (default: the toy describer) as an OpenAI-compatible API")
    _textgen_args(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8766)
    p.set_defaults(fn=cmd_textgen_serve)

    from vlmtune.reproduce.cli import add_parser as add_reproduce

    add_reproduce(command, _textgen_args)

    p = command("list", help="list methods (and their options), datasets, backbones and text-generation backends")
    p.add_argument("what", nargs="?", choices=("all", "methods", "datasets", "backbones", "textgen"), default="all")
    p.add_argument("--options", action="store_true", help="each method's options: type, default, range and doc")
    p.set_defaults(fn=cmd_list)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        print("vlmtune: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if verbose:
            log.exception("details")
        message = str(exc).strip() or type(exc).__name__
        print(f"vlmtune: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
