"""The CLI end to end on the toy world: fit -> run directory -> eval -> predict; list; tour."""

from __future__ import annotations

import csv
import json
import os
import sys

import pytest
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
    for r in rows:  # a confidence for every rank, in order
        ranked = [float(r["confidence"]), float(r["top2_confidence"]), float(r["top3_confidence"])]
        assert ranked == sorted(ranked, reverse=True) and sum(ranked) <= 1.0001
        assert len({r["prediction"], r["top2"], r["top3"]}) == 3


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


def test_usage_and_path_errors_are_one_line_naming_the_flag(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--method", "zeroshot", "--dataset", "toy:shapes", "--shots", "four"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "usage:" not in err
    assert "--shots" in err and "'four'" in err and "vlmtune fit --help" in err
    blocked = tmp_path / "file"
    blocked.write_text("")
    out = blocked / "run"  # under a file: cannot be created
    assert main(["-q", "fit", "--method", "zeroshot", "--dataset", "toy:shapes", "--no-cache", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vlmtune: error: --out {out}:") and "Errno" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_black_box_fit_eval_predict(tmp_path, capsys, precision):
    """A run records the precision of the box it trained against; eval and predict use that box again."""
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
        "--box-precision",
        precision,
    ]
    assert main(args) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["queries"] == 60
    assert json.loads((run / "config.json").read_text())["box_precision"] == precision
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


# ---- ordinary mistakes end in one clear line (issue 9, section 4) ------------------------------------------------
def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("module", "args", "extra"),
    [
        (
            "open_clip",
            ["fit", "--method", "zeroshot", "--dataset", "toy:shapes", "--backbone", "openclip:ViT-B-32"],
            "openclip",
        ),
        ("transformers", ["fit", "--method", "zeroshot", "--dataset", "toy:shapes", "--backbone", "hf:x/y"], "hf"),
        ("uvicorn", ["serve"], "serve"),
    ],
)
def test_missing_extras_name_the_pip_extra(monkeypatch, capsys, module, args, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert main(["-q", *args, "--no-cache"] if args[0] == "fit" else ["-q", *args]) == 2
    assert f'pip install "vlmtune[{extra}]"' in _err(capsys)


def test_near_miss_names_get_a_suggestion(capsys):
    for args, wanted in (
        (["fit", "--method", "CoOp", "--dataset", "toy:shapes"], "'coop'"),
        (["fit", "--method", "zeroshot", "--dataset", "Caltech101"], "'caltech101'"),
        (["fit", "--method", "coop", "--dataset", "toy:shapes", "--set", "nctx=4"], "'n_ctx'"),
    ):
        assert main(["-q", *args, "--no-cache"]) == 2
        assert f"did you mean {wanted}" in _err(capsys)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("n_ctx=4.5", "valid integer"),
        ("lr=[1,2]", "valid number"),
        ("batch_size=0", "greater than or equal to 1"),
        ("epochs=-1", "greater than or equal to 1"),
        ("epochs=0", "greater than or equal to 1"),
        ("position=top", "'end', 'middle' or 'front'"),
        ("scale_lr=yes", "cannot read"),
    ],
)
def test_bad_option_values_are_clear_errors(capsys, tmp_path, option, message):
    args = ["-q", "fit", "--method", "coop", "--dataset", "toy:shapes", "--set", option, "--out", str(tmp_path / "r")]
    assert main([*args, "--no-cache"]) == 2
    assert message in _err(capsys) and not (tmp_path / "r").exists()  # refused before anything ran


def test_options_are_discoverable(capsys):
    assert main(["list", "methods", "--options"]) == 0
    out = capsys.readouterr().out
    assert "n_ctx" in out and "default 16" in out and ">= 1" in out and "context vectors" in out
    assert "presets (--set preset=NAME): craft, carrot, reference" in out


def test_fit_needs_method_and_dataset_and_sane_shots(capsys, tmp_path):
    assert main(["-q", "fit", "--no-cache"]) == 2
    assert "--method and --dataset" in _err(capsys)
    assert main(["-q", "fit", "--method", "zeroshot", "--dataset", "toy:shapes", "--shots", "-3", "--no-cache"]) == 2
    assert "--shots must be >= 0" in _err(capsys)
    out = tmp_path / "lp"
    args = ["-q", "fit", "--method", "linear_probe", "--dataset", "toy:shapes", "--shots", "64", "--out", str(out)]
    assert main([*args, "--no-cache"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["shots"] == 64 and results["shots_used"] == {"min": 32, "max": 32}  # what was used


def test_results_carry_metrics_provenance_and_rerun_from_config(tmp_path, capsys):
    out = tmp_path / "lp"
    args = ["-q", "fit", "--method", "linear_probe", "--dataset", "toy:shapes-sketch", "--shots", "2"]
    assert main([*args, "--out", str(out), "--no-cache"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]["test"]) == {"acc1", "acc5", "mean_per_class_recall"}
    acc = results["accuracy"]["test"]
    assert acc == round(acc, 2) and results["metrics"]["test"]["acc5"] >= acc
    prov = results["provenance"]
    assert {"torch", "numpy", "python", "vlmtune"} <= set(prov["versions"]) and prov["date"] and "git" in prov
    again = tmp_path / "again"
    assert main(["-q", "fit", "--config", str(out / "config.json"), "--out", str(again), "--no-cache"]) == 0
    assert json.loads((again / "results.json").read_text())["accuracy"] == results["accuracy"]
    capsys.readouterr()
    assert main(["-q", "eval", "--run", str(out), "--out", str(tmp_path / "eval.json"), "--no-cache"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["acc1"] == acc


def test_refit_into_a_run_needs_overwrite_and_leaves_nothing_stale(tmp_path, capsys):
    out = tmp_path / "run"
    bbt = ["-q", "fit", "--method", "bbt", "--dataset", "toy:shapes-sketch", "--shots", "1", "--out", str(out)]
    assert main([*bbt, "--set", "budget=20", "--set", "popsize=10", "--curve-every", "10", "--no-cache"]) == 0
    assert (out / "curve.csv").is_file() and (out / "state").is_dir()
    lp = ["-q", "fit", "--method", "linear_probe", "--dataset", "toy:shapes-sketch", "--shots", "1", "--out", str(out)]
    assert main([*lp, "--no-cache"]) == 2
    assert "--overwrite" in _err(capsys)
    assert main([*lp, "--overwrite", "--no-cache"]) == 0
    assert not (out / "curve.csv").exists() and not (out / "state").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    lp[-1] = str(tmp_path / "mine")
    assert main([*lp, "--overwrite", "--no-cache"]) == 2  # not a run directory: never deleted
    assert "not a vlmtune run directory" in _err(capsys) and (tmp_path / "mine" / "thesis.tex").is_file()


def test_white_box_training_reports_progress_and_writes_a_log(tmp_path):
    out = tmp_path / "coop"
    args = ["fit", "--method", "coop", "--dataset", "toy:shapes-sketch", "--shots", "2", "--out", str(out)]
    assert main([*args, "--set", "epochs=3", "--set", "n_ctx=4", "--no-cache", "-q"]) == 0  # -q after the command
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["unit"] == "epoch" and r["loss"] > 0 for r in rows)
    pytest.importorskip("matplotlib")
    assert (out / "training.png").stat().st_size > 1000


def test_zero_shot_on_any_image_folder_in_one_command(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "imgs"
    test = load_dataset("toy:shapes")["test"]
    for c in (0, 1):
        (folder / test.classnames[c]).mkdir(parents=True)
        for i in (test.labels == c).nonzero()[0][:3]:
            test.image(int(i)).save(folder / test.classnames[c] / f"{i}.png")
    assert (
        main(["-q", "fit", "--method", "zeroshot", "--dataset", f"folder:{folder}", "--out", str(tmp_path / "zs")]) == 0
    )
    capsys.readouterr()
    assert main(["-q", "eval", "--dataset", f"folder:{folder}", "--no-cache"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["images"] == 6 and set(out["zeroshot"]) == {"a photo of a {}."}  # the folder's template is that one
    assert set(out["zeroshot"]["a photo of a {}."]) == {"acc1", "acc5", "mean_per_class_recall"}
    monkeypatch.chdir(tmp_path)  # the default run directory: ./runs/<name>
    assert main(["-q", "fit", "--method", "linear_probe", "--dataset", f"folder:{folder}", "--no-cache"]) == 2
    assert "has no train split" in _err(capsys)
    assert not any((tmp_path / "runs").glob("*"))  # a failed run leaves no empty run directory behind


def test_predict_writes_all_or_nothing_and_skips_corrupt_files_on_request(tmp_path, capsys):
    run = tmp_path / "zs"
    assert main(["-q", "fit", "--method", "zeroshot", "--dataset", "toy:shapes", "--out", str(run), "--no-cache"]) == 0
    images = tmp_path / "images"
    images.mkdir()
    for i in (0, 1):
        load_dataset("toy:shapes")["test"].image(i).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"not a png")
    csv_path = tmp_path / "preds.csv"
    csv_path.write_text("previous results\n")
    assert main(["-q", "predict", "--run", str(run), str(images), "--out", str(csv_path)]) == 2
    assert "broken.png" in _err(capsys) and csv_path.read_text() == "previous results\n"
    assert main(["-q", "predict", "--run", str(run), str(images), "--out", str(csv_path), "--skip-corrupt"]) == 0
    assert len(list(csv.DictReader(csv_path.open()))) == 2


def test_protocols_check_options_first_keep_finished_jobs_and_resume(tmp_path, capsys, monkeypatch):
    import vlmtune.runs.protocols as protocols

    out = tmp_path / "sweep"
    base = ["-q", "protocol", "few-shot", "--methods", "zeroshot", "linear_probe", "--dataset", "toy:shapes"]
    base += ["--shots", "1", "2", "--seeds", "1", "--out", str(out), "--no-cache"]
    assert main([*base, "--set", "linear_probe.steps=0"]) == 2  # a bad value fails before the first job
    assert "greater than or equal to 1" in _err(capsys) and not (out / "jobs.jsonl").exists()
    real_run, calls = protocols.run, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(protocols, "run", interrupted)
    assert main(base) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert len((out / "jobs.jsonl").read_text().splitlines()) == 2
    calls.clear()
    monkeypatch.setattr(protocols, "run", real_run)
    counted = []
    monkeypatch.setattr(protocols, "run", lambda *a, **k: counted.append(1) or real_run(*a, **k))
    assert main([*base, "--resume"]) == 0
    assert len(counted) == 2 and (out / "results.md").is_file()  # only the two jobs that had not finished


def test_version_and_device_auto(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("vlmtune ")
    from vlmtune.backbones import resolve_device

    assert resolve_device("auto") in ("cpu", "cuda", "mps")
    assert main(["-q", "fit", "--method", "zeroshot", "--dataset", "toy:shapes", "--device", "tpu9", "--no-cache"]) == 2
    assert "unknown device" in _err(capsys)


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import vlmtune.runs.runner as runner

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupt)
    assert main(["fit", "--method", "zeroshot", "--dataset", "toy:shapes", "--no-cache"]) == 130
    assert _err(capsys) == "vlmtune: interrupted"


def test_tour_compares_zero_shot_with_one_method_per_regime(tmp_path):
    from vlmtune.runs.tour import QUICK, TourPlan, run_tour

    assert {m for _, m, _ in QUICK.columns} >= {"zeroshot", "coop", "craft"}  # white box and black box
    assert any(o.get("template") == "a photo of a {}." for _, m, o in QUICK.columns if m == "zeroshot")
    plan = TourPlan(
        "test",
        (("toy:nonce-shapes", "made-up names"),),
        (*QUICK.columns[:2], ("CraFT", "craft", {"budget": 22, "popsize": 10})),
        (1,),
    )
    table = run_tour(plan, "toy", None, False, tmp_path)
    assert "| toy:nonce-shapes | made-up names | 20.0 | 20.0 |" in table and (tmp_path / "results.md").is_file()


def test_a_hard_query_limit_below_the_method_budget_ends_cleanly(tmp_path, capsys):
    """`--query-budget 100 --set budget=400` used to crash with a traceback and lose the run."""
    out = tmp_path / "craft"
    args = ["-q", "fit", "--method", "craft", "--dataset", "toy:shapes-sketch", "--shots", "1", "--out", str(out)]
    opts = ["--query-budget", "100", "--set", "budget=400", "--set", "popsize=10", "--set", "subspace=16"]
    assert main([*args, *opts, "--no-cache"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["queries"] <= 100 and any("allows 100 queries" in n for n in results["notes"])
    assert "allows 100 queries" in capsys.readouterr().out and (out / "adapter" / "adapter.json").is_file()


def test_the_toy_backbone_on_a_real_dataset_says_so(tmp_path, capsys, caplog):
    for name in ("cat", "dog"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 30), (40 * i, 90, 200)).save(tmp_path / "photos" / name / f"{i}.jpg")
    with caplog.at_level("WARNING"):
        assert main(["-q", "eval", "--dataset", f"folder:{tmp_path / 'photos'}", "--no-cache"]) == 0
    assert "knows only the toy world" in caplog.text and "openclip:" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["-q", "eval", "--dataset", "toy:shapes", "--no-cache"]) == 0
    assert "toy world" not in caplog.text


def test_default_run_directories_name_the_backbone_or_the_service():
    from vlmtune.cli.fit import default_run_dir
    from vlmtune.runs.runner import RunConfig

    local = RunConfig(method="craft", dataset="toy:shapes", shots=4)
    served = RunConfig(method="craft", dataset="toy:shapes", shots=4, service="http://127.0.0.1:8765")
    real = RunConfig(method="coop", dataset="caltech101", shots=16, backbone="openclip:ViT-B-16@openai")
    assert default_run_dir(local) == "runs/craft-toy_shapes-4shot-seed1"
    assert default_run_dir(served) == "runs/craft-toy_shapes-4shot-seed1-service" != default_run_dir(local)
    assert default_run_dir(real) == "runs/coop-caltech101-16shot-seed1-openclip_ViT-B-16_openai"


def test_progress_bars_refresh_rarely_when_stderr_is_not_a_terminal(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "vlmtune", "fit", "--method", "coop", "--dataset", "toy:shapes", "--shots", "4"]
    cmd += ["--set", "epochs=200", "--no-cache", "--out", str(tmp_path / "run")]  # ~3 s of bar: 34 refreshes before
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=300)  # stderr: a pipe; bytes (text mode
    assert done.returncode == 0, done.stderr[-500:]  # would turn every carriage return into a newline)
    assert done.stderr.count(b"\r") < 20  # a few per bar (11), not one per tenth of a second (34 before)
