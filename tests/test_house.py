"""The shape of the house: package contracts, one settings source, config files, exit codes, a lazy package."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from vlmtune.cli import build_parser, main
from vlmtune.errors import VlmtuneError
from vlmtune.methods.registry import get_method, list_methods, load_classifier, regime_of
from vlmtune.runs.runner import RunConfig
from vlmtune.settings import EXEC_FIELDS

ROOT = Path(__file__).resolve().parents[1]


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    env = {"PYTHONPATH": str(root / "src"), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run([str(lint), "--no-cache"], cwd=root, env=env, capture_output=True, text=True)


@pytest.mark.skipif(not Path(sys.executable).with_name("lint-imports").exists(), reason="import-linter missing")
def test_a_new_black_box_file_is_under_the_no_model_code_contract(tmp_path):
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    assert _lint(tmp_path).returncode == 0
    rogue = tmp_path / "src/vlmtune/methods/blackbox/newmethod.py"
    rogue.write_text("from vlmtune.backbones import load_backbone  # peeks at the model\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "vlmtune.methods.blackbox.newmethod -> vlmtune.backbones" in result.stdout
    rogue.write_text("from vlmtune.methods.prompt import coop  # another regime\n")
    result = _lint(tmp_path)
    assert result.returncode != 0 and "independent" in result.stdout


def test_help_and_version_import_no_torch():
    code = (
        "import sys\nfrom vlmtune.cli import build_parser\nimport vlmtune\n"
        "build_parser().format_help()\nprint(vlmtune.__version__, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [vlmtune_version(), "False"]


def vlmtune_version() -> str:
    from vlmtune._version import __version__

    return __version__


def test_public_api_loads_on_first_use():
    import vlmtune

    assert vlmtune.RunConfig is RunConfig and "run" in dir(vlmtune)
    with pytest.raises(AttributeError):
        _ = vlmtune.no_such_name


@pytest.mark.parametrize("command", ["fit", "protocol", "reproduce", "tour"])
def test_every_command_has_every_execution_setting(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    dests = {a.dest for a in sub._actions}
    assert set(EXEC_FIELDS) <= dests, set(EXEC_FIELDS) - dests


def test_run_config_is_strict_with_did_you_mean():
    with pytest.raises(VlmtuneError, match="unknown setting 'shot' \\(did you mean 'shots'\\?\\)"):
        RunConfig.from_json({"method": "zeroshot", "shot": 4})
    with pytest.raises(VlmtuneError, match="shots: input should be a valid integer, got '4'"):
        RunConfig.from_json({"shots": "4"})
    with pytest.raises(VlmtuneError, match="box_precision"):
        RunConfig.from_json({"box_precision": "fp16"})
    cfg = RunConfig.from_json({"shots": 4, "unlabeled_fraction": 1, "method_config": {"x": 1}})
    assert cfg.shots == 4 and cfg.unlabeled_fraction == 1


def test_bad_config_file_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "run.json"
    bad.write_text(json.dumps({"method": "zeroshot", "dataset": "toy:shapes", "shot": 2}))
    assert main(["-q", "fit", "--config", str(bad), "--no-cache"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vlmtune: error: run config: unknown setting 'shot' (did you mean 'shots'?)"]
    (tmp_path / "broken.toml").write_text("method = \n")
    assert main(["-q", "fit", "--config", str(tmp_path / "broken.toml"), "--no-cache"]) == 2
    assert "cannot parse --config" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_fit_from_a_config_file_with_flags_over_it(tmp_path, suffix):
    text = {
        ".toml": 'method = "zeroshot"\ndataset = "toy:shapes"\nseed = 1\nskip_corrupt = true\n[options]\n',
        ".yaml": "method: zeroshot\ndataset: toy:shapes\nseed: 1\nskip_corrupt: true\noptions: {}\n",
    }[suffix]
    if suffix == ".yaml":
        pytest.importorskip("yaml")
    config = tmp_path / f"run{suffix}"
    config.write_text(text)
    out = tmp_path / "run"
    assert main(["-q", "fit", "--config", str(config), "--seed", "2", "--out", str(out), "--no-cache"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["method"], saved["seed"], saved["skip_corrupt"]) == ("zeroshot", 2, True)


def test_protocol_from_a_config_file(tmp_path, capsys):
    config = tmp_path / "protocol.toml"
    config.write_text(
        'kind = "few-shot"\nmethods = ["zeroshot", "linear_probe"]\ndataset = "toy:shapes"\nshots = [1]\n'
        "seeds = [1]\n[options.linear_probe]\nsteps = 5\n"
    )
    out = tmp_path / "out"
    assert main(["-q", "protocol", "--config", str(config), "--out", str(out), "--no-cache"]) == 0
    rows = [json.loads(line) for line in (out / "jobs.jsonl").read_text().splitlines()]
    jobs = [json.loads(r["key"]) for r in rows]  # [job, its options, backbone]
    assert {job["method"] for job, _, _ in jobs} == {"zeroshot", "linear_probe"}
    assert [opts for job, opts, _ in jobs if job["method"] == "linear_probe"] == [{"steps": 5}]
    config.write_text('kind = "few-shot"\nmethod = ["zeroshot"]\n')
    assert main(["-q", "protocol", "--config", str(config), "--no-cache"]) == 2
    assert "unknown setting 'method' (did you mean 'methods'?)" in capsys.readouterr().err


def test_a_bug_is_not_a_usage_error(monkeypatch, capsys):
    import vlmtune.cli.listing as listing

    def broken(args):
        return {}["method"]

    monkeypatch.setattr(listing, "execute", broken)
    assert main(["list", "datasets"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vlmtune: internal error: KeyError: 'method' (run with -v for the traceback)"]


def test_malformed_adapter_json_is_a_clean_error(tmp_path):
    (tmp_path / "adapter.json").write_text(json.dumps({"classnames": ["a"]}))
    with pytest.raises(VlmtuneError):
        load_classifier(tmp_path)


def test_options_schema_lists_every_method():
    from vlmtune.methods.options import options_schema

    schema = options_schema(list_methods())
    assert set(schema["properties"]) == {m.name for m in list_methods()}
    coop = schema["properties"]["coop"]["properties"]
    assert coop["n_ctx"]["default"] == get_method("coop").config_cls().n_ctx


def test_list_methods_by_regime():
    prompt = {m.name for m in list_methods(regime="prompt")}
    assert {"coop", "cocoop", "tmm", "proda"} <= prompt and "craft" not in prompt
    assert regime_of("craft") == "blackbox" and regime_of("grip") == "labelfree"
    assert {m.name for m in list_methods(pattern="co*")} >= {"coop", "cocoop", "coft"}


def test_adapter_format_0_still_loads(tmp_path, toy_setup):
    """An adapter saved before format 1 (no format or version key) loads as it was saved."""
    fit, predict, _, _ = toy_setup("toy:nonce-shapes", "grip")
    clf = fit()
    clf.save(tmp_path, backbone="toy")
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert meta["format"] == 2 and meta["method"] == "grip" and meta["vlmtune"]
    del meta["format"], meta["vlmtune"]
    meta["classifier"] = "GRIPClassifier"  # the empty per-method subclass format 0 named
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    loaded, _ = load_classifier(tmp_path)
    assert type(loaded) is type(clf)
    torch.testing.assert_close(predict(loaded), predict(clf))
    meta["format"] = 99
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(VlmtuneError, match="upgrade vlmtune"):
        load_classifier(tmp_path)


@pytest.mark.parametrize("damage", ["bit", "nan", "scale", "scale-rehashed", "no-tensors"])
def test_a_damaged_adapter_is_refused_in_one_line(tmp_path, toy_setup, damage):
    """Issue 29 item 16: one flipped bit (92.8 -> 86.6%), NaN weights (-> 10%) and ``scale: -1`` (-> 0%) all
    loaded and scored with exit 0."""
    from safetensors.torch import load_file, save_file

    from vlmtune._io import file_sha256
    from vlmtune.methods.api import adapter_meta_sha256

    fit, _, _, _ = toy_setup("toy:nonce-shapes", "linear_probe")
    fit().save(tmp_path, backbone="toy")
    data, meta_path = tmp_path / "adapter.safetensors", tmp_path / "adapter.json"
    meta = json.loads(meta_path.read_text())
    if damage == "bit":
        raw = bytearray(data.read_bytes())
        raw[-5] ^= 0x10
        data.write_bytes(bytes(raw))
    elif damage == "nan":  # rewritten with a matching checksum: the value check still refuses it
        tensors = load_file(str(data))
        tensors["weight"][0, 0] = float("nan")
        save_file(tensors, str(data))
        meta["tensors_sha256"] = file_sha256(data)
        meta["meta_sha256"] = adapter_meta_sha256(meta)
    elif damage.startswith("scale"):
        meta["scale"] = -1
        if damage == "scale-rehashed":
            meta["meta_sha256"] = adapter_meta_sha256(meta)
    else:
        data.unlink()
    meta_path.write_text(json.dumps(meta))
    message = {
        "bit": "checksum differs",
        "nan": "not finite",
        "scale": "changed after it was saved",
        "scale-rehashed": "must be positive",
        "no-tensors": "no adapter.safetensors",
    }[damage]
    with pytest.raises(VlmtuneError, match=message):
        load_classifier(tmp_path)


def test_adapters_are_written_atomically(tmp_path, toy_setup, monkeypatch):
    """A save that fails half-way leaves the adapter that was there (or none), never a torn pair of files."""
    import vlmtune.methods.api as api

    fit, _, _, _ = toy_setup("toy:nonce-shapes", "linear_probe")
    clf = fit()
    clf.save(tmp_path, backbone="toy")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(tensors, path):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(api, "save_file", full_disk)
    with pytest.raises(OSError):
        clf.save(tmp_path, backbone="toy")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    load_classifier(tmp_path)


def test_methods_base_alias_warns():
    sys.modules.pop("vlmtune.methods.base", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from vlmtune.methods.base import Method

    assert issubclass(get_method("coop"), Method)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)


def test_writing_a_method_example(tmp_path, monkeypatch, toy_setup):
    """docs/methods/writing-a-method.md: its file registers, fits, beats chance and round-trips."""
    import importlib.util
    import re

    from vlmtune.methods import registry
    from vlmtune.metrics import accuracy

    registry.list_methods()  # the built-ins first, then the example on a copy of the registry
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    doc = (ROOT / "docs/methods/writing-a-method.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    (tmp_path / "ncm_example.py").write_text(code)
    spec = importlib.util.spec_from_file_location("ncm_example", tmp_path / "ncm_example.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "ncm_example", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    assert regime_of("ncm") == "plugin" and "ncm" in {m.name for m in list_methods()}
    fit, predict, labels, _ = toy_setup("toy:shapes", "ncm")
    clf = fit()
    assert accuracy(predict(clf), labels) > 50.0
    clf.save(tmp_path / "adapter", backbone="toy")
    loaded, meta = load_classifier(tmp_path / "adapter")
    assert meta["method"] == "ncm"
    torch.testing.assert_close(predict(loaded), predict(clf))


def test_execution_options_leave_the_job_key():
    from vlmtune.runs.protocols import ProtocolSettings, _Job, _job_key

    job = _Job("coft", "toy:shapes", 0, 1)
    keys = {
        _job_key(job, ProtocolSettings(options={"coft": options}), "toy")
        for options in ({"n_ctx": 8}, {"n_ctx": 8, "workers": 4})
    }
    assert len(keys) == 1
    assert _job_key(job, ProtocolSettings(options={"coft": {"n_ctx": 4}}), "toy") not in keys
