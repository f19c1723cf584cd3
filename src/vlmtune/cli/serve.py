"""``vlmtune serve``: a backbone as a black-box VLM over HTTP (predictions only)."""

from __future__ import annotations

import argparse
import contextlib

from vlmtune.cli.common import Command, add_key_flags, service_keys
from vlmtune.settings import PRECISION_HELP


def add(command: Command) -> None:
    p = command("serve", help="serve a backbone as a black-box VLM over HTTP (predictions only)")
    p.add_argument("--backbone", default="toy")
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765)
    add_key_flags(p, "vlmtune-service", 8000, "query")
    p.add_argument("--name", default=None, help="public model name (default: the backbone spec)")
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
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "auto"),
        default="fp32",
        help="weights of the served model: " + PRECISION_HELP,
    )
    p.set_defaults(fn=execute)


def execute(args: argparse.Namespace) -> int:
    from vlmtune.errors import require

    require("fastapi", "serve", "vlmtune serve")
    uvicorn = require("uvicorn", "serve", "vlmtune serve")
    from vlmtune.backbones import load_backbone
    from vlmtune.blackbox.accounts import UsageStore
    from vlmtune.blackbox.api import ServiceLimits
    from vlmtune.blackbox.local import LocalBlackBox
    from vlmtune.blackbox.server import create_app, server_config

    keys, db = service_keys(args)
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
    app = create_app(box, keys, UsageStore(db), args.max_body_mb * 2**20, max_in_flight=args.max_in_flight)
    print(f"serving {args.backbone} on http://{args.host}:{args.port} (docs at /docs; usage in {db})", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a server is stopped: one line, exit 0
        uvicorn.Server(server_config(app, args.host, args.port, send_timeout=args.send_timeout)).run()
    print(f"vlmtune serve: stopped (usage kept in {db})", flush=True)
    return 0
