"""The CoOp benchmark datasets that ship a ``split_zhou_<Name>.json`` (layouts of CoOp's DATASETS.md).

Each row: folder under the data root (CoOp's name first, then aliases), image sub-folder, split file,
class count, and where to download it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlmtune.data.base import DatasetSplit, files_split
from vlmtune.data.registry import register_dataset
from vlmtune.data.templates import clean_classname, templates_for
from vlmtune.errors import DatasetNotFound


@dataclass(frozen=True)
class SplitFileDataset:
    name: str
    folders: tuple[str, ...]
    image_dir: str
    split_file: str
    num_classes: int
    source: str


SPLIT_FILE_DATASETS = (
    SplitFileDataset(
        "caltech101",
        ("caltech-101", "caltech101"),
        "101_ObjectCategories",
        "split_zhou_Caltech101.json",
        100,
        "https://data.caltech.edu/records/mzrjq-6wc02 (101_ObjectCategories.tar.gz)",
    ),
    SplitFileDataset(
        "oxford_pets",
        ("oxford_pets",),
        "images",
        "split_zhou_OxfordPets.json",
        37,
        "https://www.robots.ox.ac.uk/~vgg/data/pets/ (images.tar.gz, annotations.tar.gz)",
    ),
    SplitFileDataset(
        "stanford_cars",
        ("stanford_cars",),
        "",
        "split_zhou_StanfordCars.json",
        196,
        "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (cars_train, cars_test, devkit)",
    ),
    SplitFileDataset(
        "oxford_flowers",
        ("oxford_flowers",),
        "jpg",
        "split_zhou_OxfordFlowers.json",
        102,
        "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ (102flowers.tgz, imagelabels.mat)",
    ),
    SplitFileDataset(
        "food101",
        ("food-101", "food101"),
        "images",
        "split_zhou_Food101.json",
        101,
        "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
    ),
    SplitFileDataset(
        "sun397",
        ("sun397",),
        "SUN397",
        "split_zhou_SUN397.json",
        397,
        "https://vision.princeton.edu/projects/2010/SUN/ (SUN397.tar.gz)",
    ),
    SplitFileDataset(
        "dtd",
        ("dtd",),
        "images",
        "split_zhou_DescribableTextures.json",
        47,
        "https://www.robots.ox.ac.uk/~vgg/data/dtd/",
    ),
    SplitFileDataset(
        "eurosat", ("eurosat",), "2750", "split_zhou_EuroSAT.json", 10, "http://madm.dfki.de/files/sentinel/EuroSAT.zip"
    ),
    SplitFileDataset(
        "ucf101",
        ("ucf101",),
        "UCF-101-midframes",
        "split_zhou_UCF101.json",
        101,
        "CoOp's UCF-101-midframes.zip (see CoOp DATASETS.md)",
    ),
)


def find_folder(root: Path, folders: tuple[str, ...], name: str, source: str, must_contain: str = "") -> Path:
    """The first existing ``root/<folder>`` (that holds ``must_contain``), else a ``DatasetNotFound`` with a hint."""
    for folder in folders:
        path = root / folder
        if path.is_dir() and (not must_contain or (path / must_contain).exists()):
            return path
    tried = ", ".join(str(root / f) for f in folders)
    raise DatasetNotFound(
        f"dataset {name!r} not found (looked for {tried}{' containing ' + must_contain if must_contain else ''}).\n"
        f"Put it at {root / folders[0]} following CoOp's DATASETS.md layout, or pass --data-root / set VLMTUNE_DATA.\n"
        f"Download (when online): {source}"
    )


def read_split_file(path: Path) -> dict[str, list[tuple[str, int, str]]]:
    """A CoOp ``split_zhou_*.json``: ``{split: [[relative path, label, class name], ...]}``."""
    data = json.loads(path.read_text())
    return {k: [(str(p), int(y), str(c)) for p, y, c in v] for k, v in data.items()}


def classnames_from(entries: list[tuple[str, int, str]]) -> list[str]:
    names: dict[int, str] = {}
    for _, y, c in entries:
        names.setdefault(y, clean_classname(c))
    return [names[i] for i in range(len(names))]


def load_split_file_dataset(spec: SplitFileDataset, root: Path, skip_corrupt: bool) -> dict[str, DatasetSplit]:
    folder = find_folder(root, spec.folders, spec.name, spec.source, spec.split_file)
    splits = read_split_file(folder / spec.split_file)
    classnames = classnames_from(splits["train"] + splits.get("val", []) + splits["test"])
    templates = templates_for(spec.name)
    image_root = folder / spec.image_dir if spec.image_dir else folder
    return {
        name: files_split(
            spec.name, name, image_root, [(p, y) for p, y, _ in entries], classnames, templates, skip_corrupt
        )
        for name, entries in splits.items()
    }


def _register(spec: SplitFileDataset) -> None:
    @register_dataset(spec.name, f"{spec.num_classes} classes, CoOp split {spec.split_file}")
    def _load(root: Path, skip_corrupt: bool) -> dict[str, DatasetSplit]:
        return load_split_file_dataset(spec, root, skip_corrupt)


for _spec in SPLIT_FILE_DATASETS:
    _register(_spec)
