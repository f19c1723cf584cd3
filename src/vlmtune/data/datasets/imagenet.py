"""ImageNet and its shifted test sets (-V2, -Sketch, -A, -R) in CoOp's layouts.

``classnames.txt`` (``<wnid> <class name>`` per line, CoOp's cleaned names) sits in ``imagenet/`` (variants
also look in their own folder). ImageNet's val folder is the test split, as in CoOp.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.data.base import DatasetSplit, files_split
from vlmtune.data.datasets.coop import find_folder
from vlmtune.data.registry import register_dataset
from vlmtune.data.templates import templates_for
from vlmtune.errors import DatasetNotFound

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG"}


def read_classnames(*folders: Path) -> dict[str, str]:
    for folder in folders:
        path = folder / "classnames.txt"
        if path.is_file():
            pairs = (line.strip().split(" ", 1) for line in path.read_text().splitlines() if line.strip())
            return {wnid: name for wnid, name in pairs}
    raise DatasetNotFound(f"classnames.txt not found in {', '.join(map(str, folders))} (copy CoOp's classnames.txt)")


def list_images(folder: Path, recursive: bool = False) -> list[str]:
    """Image file names in ``folder``, sorted; ``recursive``: relative paths at any depth (hidden files skipped)."""
    suffixes = {e.lower() for e in IMAGE_EXTENSIONS}
    if not recursive:
        return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in suffixes)
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")
    )


def wnid_folder_split(name: str, split: str, image_dir: Path, wnids: list[str], classnames: list[str]) -> DatasetSplit:
    items = [(f"{w}/{f}", label) for label, w in enumerate(wnids) for f in list_images(image_dir / w)]
    return files_split(name, split, image_dir, items, classnames, templates_for("imagenet"))


@register_dataset("imagenet", "1000 classes; images/train and images/val (val = test, as CoOp)")
def load_imagenet(root: Path, skip_corrupt: bool) -> dict[str, DatasetSplit]:
    folder = find_folder(root, ("imagenet",), "imagenet", "https://image-net.org/ (ILSVRC2012 train/val)", "images")
    names = read_classnames(folder)
    wnids = list(names)
    classnames = [names[w] for w in wnids]
    train = wnid_folder_split("imagenet", "train", folder / "images" / "train", wnids, classnames)
    test = wnid_folder_split("imagenet", "test", folder / "images" / "val", wnids, classnames)
    return {"train": train, "val": test, "test": test}


@register_dataset("imagenet_v2", "ImageNetV2 matched-frequency (test only)")
def load_imagenet_v2(root: Path, skip_corrupt: bool) -> dict[str, DatasetSplit]:
    folder = find_folder(root, ("imagenetv2",), "imagenet_v2", "https://github.com/modestyachts/ImageNetV2")
    names = read_classnames(folder, root / "imagenet")
    classnames = list(names.values())
    image_dir = folder / "imagenetv2-matched-frequency-format-val"
    items = [(f"{label}/{f}", label) for label in range(len(classnames)) for f in list_images(image_dir / str(label))]
    return {"test": files_split("imagenet_v2", "test", image_dir, items, classnames, templates_for("imagenet"))}


def _variant(name: str, folder_name: str, image_sub: str, source: str) -> None:
    @register_dataset(name, f"ImageNet variant {folder_name}/{image_sub} (test only)")
    def _load(root: Path, skip_corrupt: bool) -> dict[str, DatasetSplit]:
        folder = find_folder(root, (folder_name,), name, source, image_sub)
        names = read_classnames(folder, root / "imagenet")
        image_dir = folder / image_sub
        wnids = sorted(p.name for p in image_dir.iterdir() if p.is_dir() and p.name in names)
        return {"test": wnid_folder_split(name, "test", image_dir, wnids, [names[w] for w in wnids])}


_variant("imagenet_sketch", "imagenet-sketch", "images", "https://github.com/HaohanWang/ImageNet-Sketch")
_variant("imagenet_a", "imagenet-adversarial", "imagenet-a", "https://github.com/hendrycks/natural-adv-examples")
_variant("imagenet_r", "imagenet-rendition", "imagenet-r", "https://github.com/hendrycks/imagenet-r")
