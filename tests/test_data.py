"""Data: pure few-shot picks, CoOp base/new rule, split files, layouts, real data, unreadable images."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from vlmtune.data import base_new_classes, base_new_split, few_shot, few_shot_indices, load_dataset
from vlmtune.data.datasets.coop import classnames_from, read_split_file
from vlmtune.errors import CorruptImage, DatasetNotFound, UnknownName


def test_few_shot_is_pure_and_balanced():
    labels = np.repeat(np.arange(5), 20)
    a = few_shot_indices(labels, 4, seed=1)
    assert np.array_equal(a, few_shot_indices(labels.copy(), 4, seed=1))
    assert not np.array_equal(a, few_shot_indices(labels, 4, seed=2))
    assert np.bincount(labels[a]).tolist() == [4] * 5
    # adding a class leaves the other classes' picks unchanged
    more = np.concatenate([labels, np.full(20, 5)])
    assert np.array_equal(few_shot_indices(more, 4, 1)[:20], a)
    # a class with fewer than k samples gives all of them
    assert len(few_shot_indices(np.array([0, 0, 1]), 4, 1)) == 3


def test_base_new_rule_and_relabel():
    assert base_new_classes(5) == ([0, 1, 2], [3, 4])
    assert base_new_classes(100) == (list(range(50)), list(range(50, 100)))
    splits = load_dataset("toy:toynet")
    new = base_new_split(splits["test"], "new")
    assert new.classnames == splits["test"].classnames[10:]
    assert set(new.labels.tolist()) == set(range(10))
    assert new.image(0).size == (32, 32)


def test_subset_and_few_shot_keep_images_aligned():
    test = load_dataset("toy:shapes")["test"]
    fs = few_shot(test, 2, seed=3)
    assert len(fs) == 20 and fs.split == "test@2shot-seed3"
    i = 5
    parent = int(few_shot_indices(test.labels, 2, 3)[i])
    assert np.array_equal(np.asarray(fs.image(i)), np.asarray(test.image(parent)))


def test_unknown_and_missing_datasets(tmp_path):
    with pytest.raises(UnknownName):
        load_dataset("not-a-dataset")
    with pytest.raises(DatasetNotFound, match="oxford_pets"):
        load_dataset("oxford_pets", tmp_path)


@pytest.mark.realdata
def test_caltech101_standard_split(shared_data):
    splits = load_dataset("caltech101", shared_data)
    assert {k: len(v) for k, v in splits.items()} == {"train": 4128, "val": 1649, "test": 2465}
    assert splits["train"].num_classes == 100
    assert splits["train"].templates[0] == "a photo of a {}."
    for split in splits.values():
        for i in (0, len(split) // 2, len(split) - 1):
            assert split.image(i).mode == "RGB"


@pytest.mark.realdata
def test_cifar10_sample_as_image_folder(shared_data):
    splits = load_dataset(f"folder:{shared_data / 'cifar10-test'}")
    test = splits["test"]
    assert len(test) == 2000 and test.num_classes == 10
    assert np.bincount(test.labels).tolist() == [200] * 10
    assert test.image(0).size == (32, 32)


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("name", "n_classes"),
    [
        ("OxfordPets", 37),
        ("EuroSAT", 10),
        ("DescribableTextures", 47),
        ("OxfordFlowers", 102),
        ("StanfordCars", 196),
        ("UCF101", 101),
        ("Caltech101", 100),
    ],
)
def test_coop_split_files_parse(shared_data, name, n_classes):
    splits = read_split_file(shared_data / "splits" / f"split_zhou_{name}.json")
    assert set(splits) == {"train", "val", "test"}
    names = classnames_from(splits["train"] + splits["val"] + splits["test"])
    assert len(names) == n_classes
    assert all("_" not in n for n in names)  # CoOp's class-name fix


def _write_images(folder, names, size=(8, 8)):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", size, (10, 200, 30)).save(folder / n)


def test_coop_split_file_dataset_layout(tmp_path):
    root = tmp_path / "eurosat"
    _write_images(root / "2750" / "Forest", ["a.jpg", "b.jpg"])
    _write_images(root / "2750" / "River", ["c.jpg"])
    split = {
        "train": [["Forest/a.jpg", 0, "Forest"], ["River/c.jpg", 1, "River"]],
        "val": [["Forest/b.jpg", 0, "Forest"]],
        "test": [["River/c.jpg", 1, "River"]],
    }
    (root / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    splits = load_dataset("eurosat", tmp_path)
    assert splits["train"].classnames == ["Forest", "River"]
    assert splits["train"].templates[0] == "a centered satellite photo of {}."
    assert splits["test"].image(0).size == (8, 8)


def test_imagenet_and_variant_layouts(tmp_path):
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text("n01 tench\nn02 goldfish\n")
    for split in ("train", "val"):
        for wnid in ("n01", "n02"):
            _write_images(tmp_path / "imagenet" / "images" / split / wnid, ["x.JPEG"])
    splits = load_dataset("imagenet", tmp_path)
    assert splits["train"].classnames == ["tench", "goldfish"] and len(splits["test"]) == 2
    _write_images(tmp_path / "imagenet-sketch" / "images" / "n02", ["s.png"])
    sketch = load_dataset("imagenet_sketch", tmp_path)["test"]
    assert sketch.classnames == ["goldfish"] and sketch.labels.tolist() == [0]
    for label in ("0", "1"):
        _write_images(tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / label, ["v.jpeg"])
    assert load_dataset("imagenet_v2", tmp_path)["test"].labels.tolist() == [0, 1]


def test_fgvc_aircraft_layout(tmp_path):
    root = tmp_path / "fgvc_aircraft"
    _write_images(root / "images", ["001.jpg", "002.jpg"])
    (root / "variants.txt").write_text("707-320\nA300B4\n")
    for split in ("train", "val", "test"):
        (root / f"images_variant_{split}.txt").write_text("001 707-320\n002 A300B4\n")
    splits = load_dataset("fgvc_aircraft", tmp_path)
    assert splits["test"].classnames == ["707-320", "A300B4"] and splits["test"].labels.tolist() == [0, 1]
    assert "aircraft" in splits["test"].templates[0]


def test_image_folder_with_classnames_templates_and_corrupt_file(tmp_path, caplog):
    _write_images(tmp_path / "cat", ["1.png", "2.png"])
    _write_images(tmp_path / "dog", ["3.png"])
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "classnames.txt").write_text("tabby cat\nhound\n")
    (tmp_path / "templates.txt").write_text("a drawing of a {}.\n")
    test = load_dataset(f"folder:{tmp_path}")["test"]
    assert test.classnames == ["tabby cat", "hound"] and test.templates == ["a drawing of a {}."]
    broken = test.ids.index("dog/broken.jpg")
    with pytest.raises(CorruptImage, match=r"broken\.jpg"):
        test.image(broken)
    with caplog.at_level(logging.WARNING):
        clean = load_dataset(f"folder:{tmp_path}", skip_corrupt=True)["test"]
    assert len(clean) == 3 and "skipped 1 unreadable" in caplog.text
