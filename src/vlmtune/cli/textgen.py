"""``vlmtune textgen`` (pre-generate LLM / LMM texts into the text cache) and ``vlmtune textgen-serve``."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

from vlmtune.cli.common import Command, add_backbone_and_cache, add_exec_flags, add_key_flags, progress, service_keys
from vlmtune.settings import ExecSettings


def add_textgen_flags(p: argparse.ArgumentParser) -> None:
    """``--backend`` / ``--model`` / ``--endpoint``: the ExecSettings textgen fields without their prefix."""
    for name, flag in (("textgen", "--backend"), ("textgen_model", "--model"), ("textgen_endpoint", "--endpoint")):
        help = ExecSettings.__dataclass_fields__[name].metadata["help"]
        p.add_argument(flag, dest=name, default=None, help=help)


def add(command: Command) -> None:
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
    add_backbone_and_cache(p)
    add_exec_flags(p, ("device", "data_root", "skip_corrupt"))
    p.add_argument("--dataset", required=True)
    p.add_argument("--kind", required=True, choices=("image", "group", "class", "templates"))
    add_textgen_flags(p)
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
    p.set_defaults(fn=execute)

    p = command("textgen-serve", help="serve a text generator (default: the toy describer) as an OpenAI-compatible API")
    add_textgen_flags(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8766)
    add_key_flags(p, "vlmtune-textgen-service", 100_000, "completion")
    p.add_argument("--no-keys", action="store_true", help="serve anyone without a key (trusted loopback only)")
    p.set_defaults(fn=execute_serve)


def execute(args: argparse.Namespace) -> int:
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
        progress=progress(args),
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


def execute_serve(args: argparse.Namespace) -> int:
    from vlmtune.errors import require

    require("fastapi", "serve", "vlmtune textgen-serve")
    uvicorn = require("uvicorn", "serve", "vlmtune textgen-serve")
    from vlmtune.blackbox.accounts import UsageStore
    from vlmtune.blackbox.server import server_config
    from vlmtune.textgen import load_generator
    from vlmtune.textgen.serve import chat_app

    generator = load_generator(args.textgen or "toy", args.textgen_model, device=args.device)
    if args.no_keys:
        keys, store = None, None
        print("serving without API keys (--no-keys): anyone who reaches the port may generate", flush=True)
    else:
        found, db = service_keys(args)
        keys, store = found, UsageStore(db)
    app = chat_app(
        generator, keys, store=store, max_body_bytes=args.max_body_mb * 2**20, max_in_flight=args.max_in_flight
    )
    print(f"serving {generator.name}:{generator.model} on http://{args.host}:{args.port}/v1", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a server is stopped: one line, exit 0
        uvicorn.Server(server_config(app, args.host, args.port, send_timeout=args.send_timeout)).run()
    print("vlmtune textgen-serve: stopped", flush=True)
    return 0
