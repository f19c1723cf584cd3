"""Image folders: ``<root>/<class>/<image>``, optional ``classnames.txt`` and ``templates.txt``.

Without a ``split`` sub-folder layout (``<root>/{train,val,test}/<class>/...``) every image is in ``test``;
``classnames.txt`` (one name per line, in sorted folder order) renames classes, ``templates.txt`` gives templates.
``<root>/unlabeled/`` (images in any sub-folders, no class structure) is the train split of the label-free regime
when there is no ``train/``: its labels are unknown (-1); the classes come from ``test/`` or ``classnames.txt``.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.data.base import DatasetSplit, files_split
from vlmtune.data.datasets.imagenet import list_images
from vlmtune.data.templates import DEFAULT_TEMPLATE, ENSEMBLE_TEMPLATES, clean_classname
from vlmtune.errors import DatasetNotFound


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


UNKNOWN = -1  # the label of an image in <root>/unlabeled/


def load_image_folder(root: Path, skip_corrupt: bool = False) -> dict[str, DatasetSplit]:
    if not root.is_dir():
        raise DatasetNotFound(f"image folder {root} does not exist (expected <root>/<class>/<image>)")
    split_dirs = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    unlabeled = root / "unlabeled"
    layout = {s: root / s for s in split_dirs} if split_dirs else ({} if unlabeled.is_dir() else {"test": root})
    names_file, templates_file = root / "classnames.txt", root / "templates.txt"
    classes = _class_dirs(next(iter(layout.values()))) if layout else []
    if not classes and unlabeled.is_dir() and names_file.is_file():
        classes = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
    if not classes:
        raise DatasetNotFound(
            f"image folder {root} has no class sub-folders (unlabelled images in {unlabeled}/ need a "
            "test/<class>/ folder or classnames.txt)"
        )
    classnames = (
        [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
        if names_file.is_file()
        else [clean_classname(c) for c in classes]
    )
    if len(classnames) != len(classes):
        raise DatasetNotFound(f"{names_file} lists {len(classnames)} names for {len(classes)} class folders")
    templates = (
        [ln.strip() for ln in templates_file.read_text().splitlines() if "{}" in ln]
        if templates_file.is_file()
        else [DEFAULT_TEMPLATE, *ENSEMBLE_TEMPLATES]
    )
    out = {}
    for split, folder in layout.items():
        items = [
            (f"{c}/{f}", y) for y, c in enumerate(classes) if (folder / c).is_dir() for f in list_images(folder / c)
        ]
        out[split] = files_split(f"folder:{root}", split, folder, items, classnames, templates, skip_corrupt)
    if unlabeled.is_dir() and "train" not in out:
        items = [(rel, UNKNOWN) for rel in list_images(unlabeled, recursive=True)]
        if not items:
            raise DatasetNotFound(f"{unlabeled} holds no images")
        out["train"] = files_split(f"folder:{root}", "train", unlabeled, items, classnames, templates, skip_corrupt)
    return out
