"""Every registered method honours the plugin contract (parametrised over the registry)."""

from __future__ import annotations

import pytest
import torch

from vlmtune.methods.base import Classifier, list_methods, load_classifier, make_config
from vlmtune.metrics import accuracy

METHODS = [m.name for m in list_methods()]


def _fit(method_cls, toy, task, seed=1):
    return method_cls(make_config(method_cls)).fit(toy, task, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", METHODS)
def test_fits_predicts_and_beats_chance(name, toy, toy_features):
    method_cls = next(m for m in list_methods() if m.name == name)
    task, test = toy_features("toy:shapes", name)
    clf = _fit(method_cls, toy, task)
    assert isinstance(clf, Classifier)
    logits = clf.logits(test.features)
    assert logits.shape == (len(test), task.num_classes) and torch.isfinite(logits).all()
    assert accuracy(logits, test.labels) > 50.0


@pytest.mark.parametrize("name", METHODS)
def test_deterministic_under_a_seed(name, toy, toy_features):
    method_cls = next(m for m in list_methods() if m.name == name)
    task, test = toy_features("toy:shapes-sketch", name)
    a = _fit(method_cls, toy, task).logits(test.features)
    b = _fit(method_cls, toy, task).logits(test.features)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", METHODS)
def test_save_load_roundtrip(name, toy, toy_features, tmp_path):
    method_cls = next(m for m in list_methods() if m.name == name)
    task, test = toy_features("toy:nonce-shapes", name)
    clf = _fit(method_cls, toy, task)
    clf.save(tmp_path / "adapter", backbone="toy")
    loaded, meta = load_classifier(tmp_path / "adapter")
    assert meta["method"] == name and meta["backbone"] == "toy" and loaded.classnames == task.classnames
    torch.testing.assert_close(loaded.logits(test.features), clf.logits(test.features))


@pytest.mark.parametrize("name", METHODS)
def test_new_class_names_where_allowed(name, toy, toy_features):
    method_cls = next(m for m in list_methods() if m.name == name)
    task, _ = toy_features("toy:toynet", name)
    clf = _fit(method_cls, toy, task)
    new_names = ["striped star", "solid ring", "solid circle"]
    if method_cls.supports_new_classes:
        other = clf.for_classnames(new_names, toy)
        assert other.classnames == new_names
        assert other.logits(task.train.features if task.train else task.unlabeled.features).shape[1] == 3
    else:
        with pytest.raises(NotImplementedError):
            clf.for_classnames(new_names, toy)


def test_config_overrides_from_strings():
    from vlmtune.methods.linear_probe import LinearProbe
    from vlmtune.methods.zeroshot import ZeroShot

    assert make_config(ZeroShot, {"ensemble": "true"}).ensemble is True
    cfg = make_config(LinearProbe, {"lr": "0.01", "reg_grid": "[0.5, 1]"})
    assert cfg.lr == 0.01 and cfg.reg_grid == (0.5, 1)
    with pytest.raises(KeyError):
        make_config(LinearProbe, {"nope": "1"})
