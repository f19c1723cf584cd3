"""The CLI end to end on the toy world: fit -> run directory -> eval -> predict; list; tour."""

from __future__ import annotations

import csv
import json

from PIL import Image

from vlmtune.cli import main
from vlmtune.data import load_dataset


def test_fit_eval_predict(tmp_path, capsys):
    run = tmp_path / "run"
    cache = str(tmp_path / "cache")
    assert (
        main(
            [
                "-q",
                "fit",
                "--method",
                "linear_probe",
                "--dataset",
                "toy:shapes-sketch",
                "--shots",
                "4",
                "--out",
                str(run),
                "--cache-dir",
                cache,
            ]
        )
        == 0
    )
    for name in ("config.json", "results.json", "results.md", "adapter/adapter.json", "adapter/adapter.safetensors"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["shots"] == 4 and 0 <= results["accuracy"]["test"] <= 100
    capsys.readouterr()

    assert main(["-q", "eval", "--run", str(run), "--cache-dir", cache]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(out["acc1"] - results["accuracy"]["test"]) < 0.01

    images = tmp_path / "images"
    images.mkdir()
    test = load_dataset("toy:shapes-sketch")["test"]
    for i in (0, 100, 200):
        test.image(i).save(images / f"img{i}.png")
    csv_path = tmp_path / "preds.csv"
    assert main(["-q", "predict", "--run", str(run), str(images), "--out", str(csv_path), "--top-k", "3"]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 3 and all(r["prediction"] in test.classnames for r in rows)
    assert all(0 < float(r["confidence"]) <= 1 for r in rows)


def test_zeroshot_predict_with_new_classnames(tmp_path, capsys):
    run = tmp_path / "zs"
    assert main(["-q", "fit", "--method", "zeroshot", "--dataset", "toy:shapes", "--out", str(run), "--no-cache"]) == 0
    capsys.readouterr()
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (0, 0, 0)).save(img)
    assert main(["-q", "predict", "--run", str(run), str(img), "--out", "-", "--classnames", "circle,square"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split(",")[1] in ("circle", "square")


def test_list_and_errors(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "linear_probe" in out and "caltech101" in out and "toy:shapes-sketch" in out and "openclip:" in out
    assert main(["-q", "fit", "--method", "linear-probe", "--dataset", "toy:shapes", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'linear-probe'; did you mean 'linear_probe'?" in err and len(err.splitlines()) == 1


def test_black_box_fit_eval_predict(tmp_path, capsys):
    run = tmp_path / "bbt"
    args = [
        "-q",
        "fit",
        "--method",
        "bbt",
        "--dataset",
        "toy:shapes-sketch",
        "--shots",
        "2",
        "--out",
        str(run),
        "--set",
        "budget=60",
        "--set",
        "popsize=10",
        "--set",
        "subspace=16",
    ]
    assert main(args) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["queries"] == 60
    capsys.readouterr()
    assert main(["-q", "eval", "--run", str(run)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(out["acc1"] - results["accuracy"]["test"]) < 0.01
    img = tmp_path / "x.png"
    load_dataset("toy:shapes-sketch")["test"].image(0).save(img)
    assert main(["-q", "predict", "--run", str(run), str(img), "--out", "-"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split(",")[1] in load_dataset("toy:shapes-sketch")["test"].classnames


def test_protocol_commands(tmp_path, capsys):
    out = tmp_path / "b2n"
    args = ["-q", "protocol", "base-to-new", "--methods", "zeroshot", "tip_adapter", "--dataset", "toy:shapes-sketch"]
    assert main([*args, "--seeds", "1", "--set", "tip_adapter.init_beta=2", "--out", str(out), "--no-cache"]) == 0
    table = capsys.readouterr().out
    assert "| zeroshot | toy:shapes-sketch |" in table and (out / "results.csv").exists()
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"zeroshot", "tip_adapter"} and all(r["base"] > 0 for r in rows)
    assert main(["-q", "protocol", "transfer", "--methods", "zeroshot", "--dataset", "toy:toynet", "--no-cache"]) == 2
    assert "--targets" in capsys.readouterr().err
    assert main([*args, "--shots", "1", "2", "--no-cache"]) == 2
    assert main([*args, "--set", "beta=2", "--no-cache"]) == 2
    assert main([*args, "--set", "tip_adapterr.init_beta=2", "--no-cache"]) == 2
    assert "not run: tip_adapterr" in capsys.readouterr().err
