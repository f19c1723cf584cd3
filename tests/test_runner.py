"""The runner: run directories, base/new subsampling, and a real-data pass through the JPEG pipeline."""

from __future__ import annotations

import json

import pytest

from vlmtune.features import FeatureCache
from vlmtune.runs.runner import RunConfig, run


def test_run_directory_and_base_new(tmp_path):
    cfg = RunConfig(method="linear_probe", dataset="toy:toynet", shots=4, seed=2, subsample="base")
    res = run(cfg, out_dir=tmp_path / "run", progress=False)
    assert res.classifier.classnames == [
        f"{t} {s}" for s in ("circle", "triangle", "square", "diamond", "star") for t in ("solid", "striped")
    ]
    assert res.n_train == 4 * 10
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["subsample"] == "base" and saved["method_config"]["steps"] == 300
    assert "| linear_probe | toy:toynet |" in (tmp_path / "run" / "results.md").read_text()


def test_new_classes_zero_shot_through_runner():
    res = run(RunConfig(method="zeroshot", dataset="toy:toynet", shots=1, subsample="new"), progress=False)
    assert len(res.classifier.classnames) == 10 and res.accuracy["test"] > 80.0


@pytest.mark.realdata
def test_caltech101_end_to_end_on_the_toy_backbone(shared_data, tmp_path):
    cfg = RunConfig(method="linear_probe", dataset="caltech101", shots=1, data_root=str(shared_data))
    res = run(cfg, cache=FeatureCache(tmp_path), progress=False)
    assert 0.0 <= res.accuracy["test"] <= 100.0 and res.n_train == 100 and res.shots_used == {"min": 1, "max": 1}
    assert len(res.classifier.classnames) == 100 and set(res.metrics["test"]) == {
        "acc1",
        "acc5",
        "mean_per_class_recall",
    }


def test_a_full_disk_at_the_adapter_leaves_no_results_and_one_line(tmp_path, monkeypatch, capsys):
    """Issue 29 item 17: results.json was written, then the adapter failed on a full disk with a traceback."""
    from vlmtune.cli.app import main
    from vlmtune.methods.api import Classifier

    def full(self, folder, **info):
        raise OSError(28, "No space left on device", str(folder))

    monkeypatch.setattr(Classifier, "save", full)
    out = tmp_path / "run"
    code = main(["fit", "--method", "zeroshot", "--dataset", "toy:nonce-shapes", "--out", str(out), "--no-cache"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not (out / "results.json").exists()
    assert err[-1].startswith("vlmtune:") and "No space left on device" in err[-1] and "Traceback" not in "".join(err)
