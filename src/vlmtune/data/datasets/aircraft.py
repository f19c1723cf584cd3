"""FGVC-Aircraft (100 variants) from its own split lists, as CoOp reads it."""

from __future__ import annotations

from pathlib import Path

from vlmtune.data.base import DatasetSplit, files_split
from vlmtune.data.datasets.coop import find_folder
from vlmtune.data.registry import register_dataset
from vlmtune.data.templates import templates_for

SOURCE = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ (fgvc-aircraft-2013b.tar.gz, its data/ folder)"


@register_dataset("fgvc_aircraft", "100 aircraft variants, images_variant_{train,val,test}.txt")
def load_aircraft(root: Path, skip_corrupt: bool) -> dict[str, DatasetSplit]:
    folder = find_folder(root, ("fgvc_aircraft",), "fgvc_aircraft", SOURCE, "variants.txt")
    classnames = [line.strip() for line in (folder / "variants.txt").read_text().splitlines() if line.strip()]
    index = {c: i for i, c in enumerate(classnames)}
    splits = {}
    for split in ("train", "val", "test"):
        items = []
        for line in (folder / f"images_variant_{split}.txt").read_text().splitlines():
            if line.strip():
                image, variant = line.strip().split(" ", 1)
                items.append((f"{image}.jpg", index[variant]))
        splits[split] = files_split(
            "fgvc_aircraft", split, folder / "images", items, classnames, templates_for("fgvc_aircraft"), skip_corrupt
        )
    return splits
