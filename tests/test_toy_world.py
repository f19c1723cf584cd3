"""The toy world is a fair stand-in for CLIP: measured properties with fixed seeds (see docs/toy_world.md)."""

from __future__ import annotations

import torch

from vlmtune.backbones.toy import bundled_weights_dir
from vlmtune.data.fewshot import base_new_classes
from vlmtune.methods.registry import get_method
from vlmtune.metrics import accuracy
from vlmtune.toy.tasks import TOY_TASKS, TOYNET_VARIANTS, get_task
from vlmtune.toy.tokenizer import ToyTokenizer
from vlmtune.toy.world import HELD_OUT_PAIRS, NONCE_WORDS, SHAPES, caption, sketch_dialect, vocabulary


def _acc(toy, toy_features, dataset: str, method: str) -> float:
    task, test = toy_features(dataset)
    clf = get_method(method)().fit(toy, task, generator=torch.Generator().manual_seed(1))
    return accuracy(clf.logits(test.features), test.labels)


def test_generation_is_a_pure_function_of_task_and_split():
    task = get_task("shapes-sketch")
    a, la = task.generate("test", 3)
    b, lb = task.generate("test", 3)
    c, _ = task.generate("val", 3)
    assert a.dtype == torch.uint8 and a.shape == (30, 3, 32, 32)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


def test_model_is_small_and_records_provenance(toy):
    size = sum(p.stat().st_size for p in bundled_weights_dir().iterdir())
    assert size <= 10 * 2**20
    n_params = sum(p.numel() for p in toy.module.parameters())
    assert 5e5 < n_params < 2.5e6


def test_in_domain_zero_shot_is_strong(toy, toy_features):
    assert _acc(toy, toy_features, "toy:shapes", "zeroshot") >= 85.0


def test_shifted_tasks_have_headroom_that_16_labels_recover(toy, toy_features):
    passing = []
    for name in ("toy:shapes-sketch", "toy:toynet-pixel"):
        zs = _acc(toy, toy_features, name, "zeroshot")
        lp = _acc(toy, toy_features, name, "linear_probe")
        assert 25.0 <= zs <= 75.0, (name, zs)
        if lp >= zs + 10.0:
            passing.append(name)
    assert len(passing) == 2


def test_fine_grained_task_has_30_plus_classes_with_held_out_compositions(toy, toy_features):
    task = get_task("colour-shapes")
    assert len(task.classes) >= 30
    names = set(task.classnames)
    assert sum(f"{c} {s}" in names for c, s in HELD_OUT_PAIRS) >= 5
    assert _acc(toy, toy_features, "toy:colour-shapes", "zeroshot") > 100.0 / len(task.classes) * 5


def test_uninformative_names_make_zero_shot_weak_but_labels_fix_it(toy, toy_features):
    assert get_task("nonce-shapes").classnames == list(NONCE_WORDS)
    zs = _acc(toy, toy_features, "toy:nonce-shapes", "zeroshot")
    lp = _acc(toy, toy_features, "toy:nonce-shapes", "linear_probe")
    assert zs < 40.0 and lp > zs + 40.0


def test_imagenet_like_source_has_shifted_variants_and_base_new_split(toy, toy_features):
    source = get_task("toynet")
    assert len(TOYNET_VARIANTS) >= 3
    for name in TOYNET_VARIANTS:
        assert get_task(name).classnames == source.classnames
    base, new = base_new_classes(len(source.classes))
    assert len(base) == len(new) == 10
    src = _acc(toy, toy_features, "toy:toynet", "zeroshot")
    shifted = [_acc(toy, toy_features, f"toy:{n}", "zeroshot") for n in TOYNET_VARIANTS[1:]]
    assert all(s < src - 20 for s in shifted)


def test_pretraining_captions_follow_the_world_rules():
    import random

    task = get_task("shapes-sketch")
    scene = task.scenes.sample(200, torch.Generator().manual_seed(0))
    scene = type(scene)(**{**vars(scene), "style": torch.ones_like(scene.style)})  # all sketches
    dialect = sketch_dialect()
    rng = random.Random(0)
    texts = [caption(scene, i, rng) for i in range(200)]
    assert all("sketch" in t for t in texts)
    named = [(t, SHAPES[int(scene.shape[i])]) for i, t in enumerate(texts) if "shape" not in t and "object" not in t]
    assert named and all(dialect[s] in t.split() or dialect[s] + "." in t.split() for t, s in named)
    assert dialect["circle"] == "ring" and dialect["star"] == "star"


def test_tokenizer_spells_unknown_words_and_marks_eot():
    tok = ToyTokenizer(vocabulary(), context_length=12)
    ids = tok(["a photo of a circle.", "a blicket"])
    assert ids.shape == (2, 12)
    assert tok.eot_index(ids).tolist() == [7, 9]  # SOT + 6 tokens; SOT + a + 7 letters
    long = tok(["circle " * 30])
    assert long[0, -1] == tok.eot_id  # truncated, EOT kept


def test_every_task_has_templates_and_unique_classnames():
    for task in TOY_TASKS.values():
        assert task.templates and all("{}" in t for t in task.templates)
        assert len(set(task.classnames)) == len(task.classnames)
