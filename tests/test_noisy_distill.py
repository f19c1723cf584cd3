"""The noisy-label and distillation protocols of paper 003 (Tables 2-3): noisy train labels (pair flip, CIFAR-100N
read without unpickling), CIFAR-100's binary files, CoFT with a student backbone."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
from tests.conftest import FAST_COFT

from vlmtune import load_backbone, load_dataset
from vlmtune.cli import main
from vlmtune.data.noisy import noise_rate, pairflip, read_cifar100n
from vlmtune.errors import VlmtuneError
from vlmtune.methods.registry import load_classifier
from vlmtune.runs.protocols import ProtocolSettings, noisy_labels
from vlmtune.runs.runner import RunConfig, run

TOY_COFT = {**FAST_COFT, "shots": 8}


def test_pair_flip_moves_the_given_share_to_the_next_class_only():
    labels = np.repeat(np.arange(20), 200)
    noisy = pairflip(labels, 20, 0.4, seed=0)
    wrong = noisy != labels
    assert 37 < 100 * wrong.mean() < 43
    assert np.array_equal(noisy[wrong], (labels[wrong] + 1) % 20)  # class-dependent: always the next class
    assert np.array_equal(noisy, pairflip(labels, 20, 0.4, seed=0))


def test_a_noisy_dataset_changes_only_its_train_labels():
    clean = load_dataset("toy:shapes-noisy")
    noisy = load_dataset("toy:shapes-noisy@noisy=pairflip-0.4-s3")
    assert noisy["train"].dataset == "toy:shapes-noisy@noisy=pairflip-0.4-s3"
    assert 30 < noise_rate(clean["train"], noisy["train"]) < 50
    for split in ("val", "test"):
        assert np.array_equal(clean[split].labels, noisy[split].labels)
    with pytest.raises(VlmtuneError, match="unknown label noise"):
        load_dataset("toy:shapes@noisy=symmetric-0.4")


def _write_cifar(root, n_train: int = 20, n_test: int = 10):
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    names = [f"class_{i}" for i in range(100)]
    (folder / "fine_label_names.txt").write_text("\n".join(names) + "\n")
    rng = np.random.default_rng(0)
    labels = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n).astype(np.uint8)
        records = np.concatenate([np.zeros((n, 1), np.uint8), fine[:, None], rng.integers(0, 256, (n, 3072))], 1)
        records.astype(np.uint8).tofile(folder / f"{split}.bin")
        labels[split] = fine.astype(np.int64)
    return labels


def test_cifar100_binary_and_cifar100n_labels_load_without_unpickling(tmp_path):
    labels = _write_cifar(tmp_path)
    splits = load_dataset("cifar100", tmp_path)
    assert len(splits["train"]) == 20 and splits["train"].classnames[1] == "class 1"
    assert splits["train"].image(0).size == (32, 32) and np.array_equal(splits["train"].labels, labels["train"])
    noisy = (labels["train"] + 7) % 100
    (tmp_path / "cifar-100").mkdir()
    human = {"clean_label": labels["train"], "noisy_label": noisy, "noisy_coarse_label": noisy // 5}
    torch.save(human, tmp_path / "cifar-100" / "CIFAR-100_human.pt")
    assert np.array_equal(read_cifar100n(tmp_path / "cifar-100" / "CIFAR-100_human.pt")["noisy_label"], noisy)
    assert np.array_equal(load_dataset("cifar100@noisy=cifar100n", tmp_path)["train"].labels, noisy)
    # images in another order than the file's clean labels: refused
    torch.save({**human, "clean_label": labels["train"][::-1].copy()}, tmp_path / "shuffled.pt")
    with pytest.raises(VlmtuneError, match="not in CIFAR-100's train order"):
        load_dataset(f"cifar100@noisy=cifar100n:{tmp_path / 'shuffled.pt'}", tmp_path)


class Payload:
    """An arbitrary picklable object: torch.load(weights_only=True) must refuse to rebuild it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_a_label_file_holding_other_objects_is_refused(tmp_path, capsys):
    torch.save({"noisy_label": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(VlmtuneError, match="not a CIFAR-100N label file"):
        read_cifar100n(tmp_path / "evil.pt")
    assert "unpickled!" not in capsys.readouterr().out
    torch.save({"noisy_label": collections.Counter([1, 2])}, tmp_path / "counter.pt")  # loads, but no array
    with pytest.raises(VlmtuneError, match="not a CIFAR-100N label file"):
        read_cifar100n(tmp_path / "counter.pt")
    with pytest.raises(VlmtuneError, match="CIFAR-100N labels not found"):
        read_cifar100n(tmp_path / "absent.pt")


def test_noisy_label_protocol_trains_supervised_methods_on_the_noise_and_coft_without_labels(toy, tmp_path):
    settings = ProtocolSettings(backbone=toy, options={"coft": TOY_COFT}, progress=False)
    result = noisy_labels(["linear_probe", "coft"], "toy:shapes-noisy", "pairflip-0.4", (1,), settings)
    settings_of = {r["method"]: r["setting"] for r in result.rows}
    assert settings_of["coft"].endswith("labels ignored") and settings_of["linear_probe"].endswith("trained on them")
    assert "% wrong" in settings_of["coft"]
    table = result.markdown()
    assert "79.40" in table and "72.41 (CE)" in table  # paper 003 Table 2 beside


def test_coft_distils_a_teacher_into_a_student(toy, tmp_path):
    out = tmp_path / "run"
    cfg = RunConfig(method="coft", dataset="toy:shapes", student="toy:small", options=TOY_COFT)
    res = run(cfg, out, backbone=toy, progress=False)
    clf, meta = load_classifier(out / "adapter")
    assert meta["backbone"] == "toy:small"  # the adapter runs on the student
    small = load_backbone("toy:small")
    assert clf.image_encoder(small).embed_dim == small.embed_dim  # one tower (final=first) of the student
    assert res.accuracy["test"] > 30.0
    with pytest.raises(VlmtuneError, match="does not distil"):
        run(RunConfig(method="upl", dataset="toy:shapes", student="toy:small"), backbone=toy, progress=False)


def test_distill_protocol_puts_the_student_alone_beside_the_distilled_student(toy, tmp_path, capsys):
    args = ["-q", "protocol", "distill", "--methods", "zeroshot", "coft", "--dataset", "toy:shapes"]
    args += ["--teacher", "toy", "--student", "toy:small", "--seeds", "1", "--out", str(tmp_path / "p"), "--no-cache"]
    args += [f"--set=coft.{k}={v}" for k, v in TOY_COFT.items()]
    assert main(args) == 0
    rows = json.loads((tmp_path / "p" / "results.json").read_text())["rows"]
    settings = {(r["method"], r["setting"]) for r in rows}
    assert ("coft", "toy -> toy:small") in settings and ("coft", "toy:small alone") in settings
    assert ("zeroshot", "toy alone") in settings and ("zeroshot", "toy -> toy:small") not in settings
    assert "79.11" in capsys.readouterr().out  # paper 003 Table 3's CoFT average beside the distilled row
