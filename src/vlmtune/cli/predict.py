"""``vlmtune predict``: classes of image files or folders -> CSV."""

from __future__ import annotations

import argparse
import csv
import functools
import io
import logging
import os
import sys
from pathlib import Path
from typing import Any

from vlmtune.cli.common import Command, progress
from vlmtune.cli.evaluate import load_run
from vlmtune.errors import VlmtuneError

log = logging.getLogger("vlmtune")


def _same(image: Any) -> Any:
    return image


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def add(command: Command) -> None:
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
    p.set_defaults(fn=execute)


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


def execute(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from vlmtune.backbones import load_backbone
    from vlmtune.data.base import open_image
    from vlmtune.errors import CorruptImage

    clf, meta, config = load_run(Path(args.run))
    files = _collect_images(args.images)
    box: Any = None
    backbone = None
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
    ranks = [col for i in range(2, k + 1) for col in (f"top{i}", f"top{i}_confidence")]
    writer.writerow(["path", "prediction", "confidence", *ranks])
    skipped = 0
    for start in tqdm(range(0, len(files), 64), desc="predicting", unit="batch", disable=not progress(args)):
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
            data = [upload_bytes(f, functools.partial(_same, im)) for f, im in zip(batch, images, strict=True)]
            ids = box.upload(data)
            logits = clf.predict_blackbox(box, ImageRefs(ids, torch.zeros(len(ids), dtype=torch.long), images))
        else:
            prep = clf.image_encoder(backbone).preprocess  # the encoder's own (an LMM pads to its square)
            logits = clf.predict_images(backbone, torch.stack([prep(im) for im in images]))
        conf, idx = logits.softmax(-1).topk(k, dim=-1)  # (B, k)
        for f, c, i in zip(batch, conf.tolist(), idx.tolist(), strict=True):
            ranked = [v for j, cj in zip(i, c, strict=True) for v in (clf.classnames[j], f"{cj:.4f}")]
            writer.writerow([str(f), *ranked])
    if args.out == "-":
        sys.stdout.write(buffer.getvalue())
    else:
        from vlmtune._io import atomic_write

        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(buffer.getvalue()))  # all or nothing
        print(
            f"{len(files) - skipped} predictions written to {args.out}" + (f" ({skipped} skipped)" if skipped else "")
        )
    return 0
