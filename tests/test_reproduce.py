"""``vlmtune reproduce``: every recipe matches its paper table and dry-runs on the toy world; one small toy run end
to end, resumed; the comparison's averages follow the papers' conventions; what is missing is said before a run."""

from __future__ import annotations

import json

import pytest

from vlmtune.cli import main
from vlmtune.methods.registry import get_method, make_config
from vlmtune.reproduce import RECIPES, Reproduction, Selection, plan, unavailable_rows
from vlmtune.reproduce.plan import backbone_missing
from vlmtune.runs.paper_tables import paper_table, table_keys


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_matches_its_table_and_dry_runs_on_the_toy_world(name, capsys):
    recipe = RECIPES[name]
    assert {r.label for r in recipe.rows} == set(recipe.paper.rows)  # every published row, no invented one
    for row in recipe.rows:
        if row.method is not None:
            make_config(get_method(row.method), row.options)  # options and presets valid for the method
    groups = plan(recipe, Selection(toy=True))
    assert groups and all(g.spec == "toy" for g in groups)
    assert main(["reproduce", name, "--toy", "--dry-run"]) == 0
    out = capsys.readouterr().out
    runs = sum(g.runs for g in groups)
    assert f"{runs} runs, {runs} ready" in out
    for row in unavailable_rows(recipe):
        assert row.label in out.splitlines()[1]  # "rows not in vlmtune yet (left out): ..."


def test_every_published_table_has_a_recipe_and_the_numbers_are_the_papers():
    assert {r.table for r in RECIPES.values()} == set(table_keys())
    t = paper_table("002_table1")
    assert t.get("tmm", "avg/base") == 83.01 and t.get("tmm", "avg/H") == 79.02
    assert paper_table("001_table1").get("craft", "imagenet", "RN50") == 61.33
    assert paper_table("000_table2").get("craft", "imagenet", "RN50") == 61.17  # CARROT's differs from CraFT's here
    with pytest.raises(KeyError, match="known"):
        paper_table("009_table1")


def test_a_small_toy_run_end_to_end_resumes_and_prices_the_next_dry_run(tmp_path, capsys):
    out = tmp_path / "rep"
    args = ["-q", "reproduce", "002-table4", "--toy", "--seeds", "1", "--rows", "zeroshot", "coop"]
    args += ["--set", "coop.epochs=1", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    cells = {(c["row"], c["column"]): c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert set(cells) == {(r, c) for r in ("zeroshot", "coop") for c in paper_table("002_table4").columns}
    zs = cells["zeroshot", "imagenet_sketch"]
    assert zs["paper"] == 46.15 and zs["diff"] == pytest.approx(zs["ours"] - 46.15, abs=0.01)
    md = (out / "results.md").read_text()
    assert "imagenet_sketch = toy:toynet-sketch" in md and "| coop | " in md
    settings = json.loads((out / "settings.json").read_text())
    assert settings["toy"] and settings["versions"]["vlmtune"]
    coop = next(r for r in settings["groups"][0]["rows"] if r["label"] == "coop")
    assert coop["options"] == {"epochs": "1", "n_ctx": 8}  # the toy text tower's 20 positions cap the prompt
    capsys.readouterr()
    assert main(args) == 0  # everything is in the job log: nothing runs again
    assert json.loads((out / "results.json").read_text())["cells"] == list(cells.values())
    assert main(["reproduce", "002-table4", "--toy", "--seeds", "1", "--dry-run", "--out", str(out)]) == 0
    dry = capsys.readouterr().out
    assert "for the 2 runs with a measured time; 2 unmeasured" in dry  # zeroshot and coop priced, cocoop and tmm not


def test_averages_follow_the_papers_conventions():
    rep = Reproduction(RECIPES["002-table1"])
    for d, base, new in (("caltech101", 90.0, 80.0), ("dtd", 70.0, 60.0)):
        rep.add("ViT-B/16", "tmm", f"{d}/base", [base, base + 2])
        rep.add("ViT-B/16", "tmm", f"{d}/new", [new])
    cells = {c["column"]: c for c in rep.cells()}
    assert "avg/base" not in cells  # 2 of 11 datasets measured: no average
    for d in set(RECIPES["002-table1"].dataset_columns()) - {"caltech101", "dtd"}:
        rep.add("ViT-B/16", "tmm", f"{d}/base", [80.0])
        rep.add("ViT-B/16", "tmm", f"{d}/new", [70.0])
    cells = {c["column"]: c for c in rep.cells()}
    avg_base, avg_new = (91 + 71 + 9 * 80) / 11, (80 + 60 + 9 * 70) / 11
    assert cells["avg/base"]["ours"] == pytest.approx(avg_base, abs=0.01)
    assert cells["avg/H"]["ours"] == pytest.approx(2 * avg_base * avg_new / (avg_base + avg_new), abs=0.01)
    assert cells["caltech101/base"]["std"] == pytest.approx(1.41, abs=0.01)

    transfer = Reproduction(RECIPES["001-table2"])
    for value, column in enumerate(("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")):
        transfer.add("RN50", "craft", column, [float(value)])
    avg = next(c for c in transfer.cells() if c["column"] == "avg")
    assert avg["ours"] == 2.5 and avg["paper"] == 42.32  # the four targets, not the source


def test_what_is_missing_is_said_before_anything_runs(tmp_path, capsys):
    assert backbone_missing("toy") is None
    assert "weights not cached" in (backbone_missing("openclip:ViT-B-16@openai") or "")
    args = ["reproduce", "003-table1", "--backbone", "ViT-B/16", "--data-root", str(tmp_path), "--datasets", "dtd"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "weights not cached" in out and "dataset 'dtd' not found" in out and "0 ready" in out
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmtune: error: 1 of 1 groups cannot run") and "Traceback" not in err
    assert main(["reproduce", "001-table1", "--rows", "craf"]) == 2
    err = capsys.readouterr().err
    assert "craf" in err and "craft" in err and "Traceback" not in err


def test_a_dry_run_names_download_sources_and_how_to_price_and_list_names_twin_tables(tmp_path, capsys):
    args = ["reproduce", "001-table1", "--data-root", str(tmp_path), "--backbone", "ViT-B/16", "--dry-run"]
    args += ["--datasets", "oxford_pets", "--out", str(tmp_path / "rep")]
    assert main(args) == 0
    dry = capsys.readouterr().out
    assert "Download (when online): https://www.robots.ox.ac.uk/~vgg/data/pets/" in dry
    assert "to price them: run one seed of one dataset first (--seeds 1 --datasets oxford_pets)" in dry
    assert main(["reproduce", "--list"]) == 0
    listing = capsys.readouterr().out.split("\n000-table2")[0]  # 000-table1's entry
    assert "the same published numbers as 001-table1 (one table, in both papers" in listing
