"""BBT and CraFT on the toy world: they adapt through the black box alone (fixed seeds, tests that can fail)."""

from __future__ import annotations

import pytest
import torch

from vlmtune.blackbox.api import QueryBudget
from vlmtune.blackbox.local import LocalBlackBox
from vlmtune.data import few_shot, load_dataset
from vlmtune.methods.base import Task, get_method, make_config
from vlmtune.metrics import accuracy
from vlmtune.runs.runner import RunConfig, run, upload_split


def _setup(toy, dataset, budget=None):
    splits = load_dataset(dataset)
    box = LocalBlackBox(toy, QueryBudget(budget))
    train = few_shot(splits["train"], 16, 1)
    task = Task(train.classnames, train.templates, train=upload_split(box, train, False))
    return box, task, upload_split(box, splits["test"], False)


def _acc(method, toy, box, task, test, seed=1, **options):
    cls = get_method(method)
    clf = cls(make_config(cls, options)).fit(box, task, generator=torch.Generator().manual_seed(seed))
    return accuracy(clf.predict_blackbox(box, test), test.labels)


def test_methods_keep_to_their_budget_and_a_hard_limit_ends_the_run_cleanly(toy):
    box, task, test = _setup(toy, "toy:shapes-sketch", budget=250)
    cls = get_method("craft")
    options = {"popsize": 10, "subspace": 32}
    cls(make_config(cls, {"budget": 110, **options})).fit(box, task, generator=torch.Generator().manual_seed(1))
    assert box.usage().used == 110  # 10 generations x (10 candidates + 1 mean prompt)

    method = cls(make_config(cls, {"budget": 400, **options}))  # 400 planned, 140 left on the box
    clf = method.fit(box, task, generator=torch.Generator().manual_seed(1))
    assert box.usage().used == 110 + 12 * 11  # planned within the limit: 12 generations
    assert any("allows 140 queries" in n for n in method.hooks.notes)
    assert clf.predict_blackbox(box, test).shape == (len(test), 10)  # one query more: the last one


class _SilentLimit(LocalBlackBox):
    """A box that does not say how much budget is left (a shared key, another client spending it)."""

    def usage(self):
        u = super().usage()
        return type(u)(u.used, None, u.images)


def test_a_limit_met_mid_run_keeps_the_adapter_so_far(toy):
    splits = load_dataset("toy:shapes-sketch")
    box = _SilentLimit(toy, QueryBudget(100))
    train = few_shot(splits["train"], 4, 1)
    task = Task(train.classnames, train.templates, train=upload_split(box, train, False))
    cls = get_method("craft")
    method = cls(make_config(cls, {"budget": 400, "popsize": 10, "subspace": 32}))
    clf = method.fit(box, task, generator=torch.Generator().manual_seed(1))
    assert box.budget.used <= 100 and clf.head is not None
    assert any("stopped early" in n for n in method.hooks.notes)


def test_short_budget_bbt_and_craft_beat_zero_shot_on_sketches(toy):
    box, task, test = _setup(toy, "toy:shapes-sketch")
    zero_shot = run(RunConfig(method="zeroshot", dataset="toy:shapes-sketch"), progress=False).accuracy["test"]
    bbt = _acc("bbt", toy, box, task, test, budget=800)
    craft = _acc("craft", toy, box, task, test, budget=820)
    assert bbt >= zero_shot + 10 and craft >= zero_shot + 10


def test_runner_reports_queries(tmp_path):
    res = run(
        RunConfig(method="bbt", dataset="toy:nonce-shapes", shots=4, options={"budget": 100, "popsize": 10}),
        out_dir=tmp_path,
        progress=False,
    )
    assert res.queries == 100
    assert (tmp_path / "adapter" / "adapter.safetensors").stat().st_size < 1_000_000


def test_accuracy_vs_queries_curve_does_not_change_the_result(tmp_path):
    options = {"budget": 132, "popsize": 10, "subspace": 32}
    plain = run(RunConfig(method="craft", dataset="toy:nonce-shapes", shots=2, options=options), progress=False)
    cfg = RunConfig(method="craft", dataset="toy:nonce-shapes", shots=2, options=options, curve_every=33)
    curved = run(cfg, out_dir=tmp_path, progress=False)
    assert curved.accuracy == plain.accuracy
    queries = [q for q, _ in curved.curve]
    assert queries == sorted(queries) and queries[-1] == curved.queries == 132 and len(queries) >= 4
    assert curved.curve[-1][1] == curved.accuracy["test"]
    rows = (tmp_path / "curve.csv").read_text().splitlines()
    assert rows[0] == "queries,test_accuracy" and len(rows) == len(queries) + 1
    pytest.importorskip("matplotlib")
    assert (tmp_path / "curve.png").stat().st_size > 1000


class Killed(Exception):
    pass


def test_resume_after_a_kill_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
    from vlmtune.errors import VlmtuneError
    from vlmtune.runs.journal import FileJournal

    cfg = RunConfig(
        method="craft", dataset="toy:nonce-shapes", shots=2, options={"budget": 330, "popsize": 10, "subspace": 32}
    )
    full = run(cfg, out_dir=tmp_path / "full", progress=False)
    record, calls = FileJournal.record, []

    def dying(self, rec):
        record(self, rec)
        calls.append(1)
        if len(calls) == 27:  # mid-way: 2 chunks of 10 steps on disk, 7 steps lost
            raise Killed

    monkeypatch.setattr(FileJournal, "record", dying)
    with pytest.raises(Killed):
        run(cfg, out_dir=tmp_path / "run", progress=False)
    monkeypatch.undo()
    resumed = run(cfg, out_dir=tmp_path / "run", progress=False, resume=True)
    assert resumed.accuracy == full.accuracy and resumed.queries == full.queries == 330
    torch.testing.assert_close(resumed.classifier.context, full.classifier.context, rtol=0, atol=0)
    for a, b in zip(resumed.classifier.head.parameters(), full.classifier.head.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = RunConfig(method="craft", dataset="toy:nonce-shapes", shots=2, seed=2, options=cfg.options)
    with pytest.raises(VlmtuneError, match="different configuration"):
        run(other, out_dir=tmp_path / "run", progress=False, resume=True)


def test_craft_artifact_is_under_1mb_for_100_classes_and_round_trips(tmp_path):
    from vlmtune.methods._refine import RefinementHead
    from vlmtune.methods.base import load_classifier
    from vlmtune.methods.craft import CraftClassifier

    meta = {"k": 100, "hidden": 512, "layers": 3, "residual": True}  # the paper's head
    clf = CraftClassifier(
        [f"class {i}" for i in range(100)],
        "a photo of a {}.",
        torch.randn(4, 512) * 0.01,
        RefinementHead(100, 512, 3),
        meta,
    )
    clf.save(tmp_path, backbone="openclip:ViT-B-32@openai")
    size = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert size < 1_000_000
    loaded, _ = load_classifier(tmp_path)
    scores = torch.randn(7, 100) * 10
    torch.testing.assert_close(loaded.refine(scores), clf.refine(scores), rtol=0, atol=0)
