"""No path to the labels: everything a label-free method can reach, walked, on a class-foldered image folder.

The folder is laid out as Caltech101 / DTD / EuroSAT ... are: ``train/<class>/<file>``, so a file's path names its
class. At the entry of ``fit`` the test walks what the method can reach from its arguments and itself (attributes,
slots, containers, closures, defaults, bound methods' ``__self__``, ``functools.partial``; not modules, classes or
function globals, through which all of Python is reachable) and looks for the hidden labels (in the stored and in
the handed order), the sample file names and the class folders' paths; then checks the order the unlabelled images
arrive in is not the stored, class-sorted one.
"""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Mapping

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.conftest import FAST_OPTIONS
from torch import nn

from vlmtune.backbones.base import Backbone
from vlmtune.data import load_dataset
from vlmtune.errors import VlmtuneError
from vlmtune.features.extract import extract_features
from vlmtune.methods.registry import list_methods, load_classifier
from vlmtune.runs.runner import RunConfig, run

LABEL_FREE = [m for m in list_methods() if not m.needs_labels and m.needs_train]
PROBE = "leakprobe"  # in every sample's file name


class _Reached(Exception):
    """Raised by the spy at fit's entry: the walk is done, no need to train."""


@pytest.fixture(scope="module")
def foldered(tmp_path_factory):
    """toy:shapes images saved as train/<class>/leakprobe_<k>.png (8 per class) and test/<class>/ (2 per class)."""
    root = tmp_path_factory.mktemp("classfolders")
    source = load_dataset("toy:shapes")
    for split, per_class in (("train", 8), ("test", 2)):
        data = source[split]
        for c, name in enumerate(data.classnames):
            folder = root / split / name.replace(" ", "_")
            folder.mkdir(parents=True)
            for k, i in enumerate(np.flatnonzero(data.labels == c)[:per_class]):
                data.image(int(i)).save(folder / f"{PROBE}_{k:03d}.png")
    return root


def reachable(*roots, limit: int = 400_000):
    """Every object reachable from ``roots`` the way a method's code could reach it without importing anything."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, types.ModuleType | type | types.BuiltinFunctionType):
            continue
        seen.add(id(obj))
        assert len(seen) < limit, "the walk did not end: raise the limit"
        yield obj
        if isinstance(obj, str | bytes | int | float | bool | torch.Tensor | np.ndarray | torch.dtype | torch.device):
            continue
        if isinstance(obj, Mapping):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, list | tuple | set | frozenset):
            stack += list(obj)
        if isinstance(obj, types.FunctionType):
            stack += [c.cell_contents for c in obj.__closure__ or () if _filled(c)]
            stack += [obj.__defaults__ or (), obj.__kwdefaults__ or {}]
        elif isinstance(obj, types.MethodType):
            stack += [obj.__self__, obj.__func__]
        elif isinstance(obj, functools.partial):
            stack += [obj.func, obj.args, obj.keywords]
        stack += list(getattr(obj, "__dict__", {}).values())
        for klass in type(obj).__mro__:
            for slot in getattr(klass, "__slots__", ()):
                if slot not in ("__weakref__", "__dict__") and hasattr(obj, slot):
                    stack.append(getattr(obj, slot))


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def _spy(monkeypatch, method_cls, seen):
    def spy(self, handle, task, *, generator):
        seen["task"] = task
        seen["objects"] = list(reachable(self, handle, task, generator))
        raise _Reached

    monkeypatch.setattr(method_cls, "fit", spy)


@pytest.mark.parametrize("method_cls", LABEL_FREE, ids=lambda m: m.name)
def test_nothing_a_label_free_method_reaches_gives_the_labels_away(method_cls, foldered, toy, monkeypatch):
    seen: dict = {}
    _spy(monkeypatch, method_cls, seen)
    options = FAST_OPTIONS[method_cls.name]
    cfg = RunConfig(method=method_cls.name, dataset=f"folder:{foldered}", shots=0, options=options)
    with pytest.raises(_Reached):
        run(cfg, backbone=toy, progress=False)
    stored = load_dataset(f"folder:{foldered}")["train"]
    hidden = torch.as_tensor(stored.labels)
    assert (hidden.diff() >= 0).all() and len(hidden.unique()) == 10  # stored by class, as on disk

    task = seen["task"]
    handed = task.unlabeled.features  # (N, D): recover the order the method got by matching the stored features
    stored_feats = extract_features(toy, stored, progress=False).features
    order = (handed @ stored_feats.T).argmax(1)
    assert sorted(order.tolist()) == list(range(len(stored))), "the handed images are not the stored ones"
    in_handed_order = hidden[order]
    assert not (in_handed_order.diff() >= 0).all(), "the unlabelled images arrive sorted by class"

    for obj in seen["objects"]:
        if isinstance(obj, torch.Tensor | np.ndarray) and obj.ndim == 1 and len(obj) == len(hidden):
            values = torch.as_tensor(np.asarray(obj)) if isinstance(obj, np.ndarray) else obj.detach().cpu()
            if not values.is_floating_point():
                assert not torch.equal(values.long(), hidden), f"the stored labels are in reach: {type(obj)}"
                assert not torch.equal(values.long(), in_handed_order), "the labels in handed order are in reach"
        if isinstance(obj, str):
            assert PROBE not in obj, f"a sample path is in reach: {obj!r}"
            assert f"{foldered}/train" not in obj, f"the class folders' path is in reach: {obj!r}"


def test_the_walk_finds_a_leak_when_there_is_one(foldered, toy, monkeypatch):
    """The test above can fail: the hook holding the runner's label tensor (main before this contract) is found."""
    from vlmtune.runs import runner
    from vlmtune.runs.diagnostics import PseudoLabelLog

    class Leaky(runner.PseudoLabelReports):
        def __init__(self) -> None:
            super().__init__()
            self.log = PseudoLabelLog(torch.as_tensor(load_dataset(f"folder:{foldered}")["train"].labels), 10)

    monkeypatch.setattr(runner, "PseudoLabelReports", Leaky)
    upl = next(m for m in LABEL_FREE if m.name == "upl")
    seen: dict = {}
    _spy(monkeypatch, upl, seen)
    with pytest.raises(_Reached):
        run(RunConfig(method="upl", dataset=f"folder:{foldered}", options=FAST_OPTIONS["upl"]), backbone=toy)
    hidden = torch.as_tensor(load_dataset(f"folder:{foldered}")["train"].labels)
    found = [o for o in seen["objects"] if isinstance(o, torch.Tensor) and o.shape == hidden.shape]
    assert any(torch.equal(o, hidden) for o in found)


def test_the_order_differs_between_seeds_and_pseudo_labels_are_scored_after_fit(foldered, toy):
    """Scores come back although the method never held the labels; two seeds give two orders."""
    results = [
        run(
            RunConfig(method="upl", dataset=f"folder:{foldered}", seed=s, options=FAST_OPTIONS["upl"]),
            backbone=toy,
            progress=False,
        )
        for s in (1, 2)
    ]
    for r in results:
        assert r.pseudo_labels and r.pseudo_labels[0]["kind"] == "all" and r.pseudo_labels[0]["n"] == 80
        assert r.pseudo_labels[0]["accuracy"] is not None
    # zero-shot labels of all images are the same set in any order: their accuracy does not depend on the seed
    assert results[0].pseudo_labels[0]["accuracy"] == results[1].pseudo_labels[0]["accuracy"]
    from vlmtune.runs.runner import shuffled_order

    assert not np.array_equal(shuffled_order(80, 1), shuffled_order(80, 2))


# ---- every label-free method on a backbone that is not a ViT, written through the public subclass API ----------


class ConvTower(nn.Module):
    """A small ResNet-like tower: (B, 3, 32, 32) -> pooled (B, D) and spatial features (B, 16, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, 2, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        self.body = nn.Sequential(block(3, 32), block(32, 64), block(64, 128))  # (B, 128, 4, 4)
        self.proj = nn.Conv2d(128, dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spatial = self.proj(self.body(x)).flatten(2).transpose(1, 2)  # (B, 16, D)
        return spatial.mean(1), spatial


class ConvCLIP(Backbone):
    """The toy CLIP's text tower beside a convolutional image tower (no ``.visual``: it says ``image_tower()``)."""

    def __init__(self, toy: Backbone) -> None:
        self.model = nn.Module()
        self.model.text = copy.deepcopy(toy.model.text)
        self.model.tower = ConvTower(toy.embed_dim)
        self.model.logit_scale = nn.Parameter(toy.model.logit_scale.detach().clone())
        self.model.eval()
        self.tokenizer, self.eot_token_id = toy.tokenizer, toy.eot_token_id
        self.spec, self.embed_dim, self.token_width = "test:convclip", toy.embed_dim, toy.token_width
        self.context_length, self.preprocess = toy.context_length, toy.preprocess
        self.preprocess_id = toy.preprocess_id

    def tokenize(self, texts):
        return self.tokenizer(texts)

    def embed_tokens(self, tokens):
        return self.model.text.embed_tokens(tokens.to(self.device))

    def _text_forward(self, embeds, eot_index):
        return self.model.text(embeds, eot_index.to(embeds.device))

    def _image_forward(self, images):
        return self.model.tower(images)

    def image_tower(self) -> nn.Module:
        return self.model.tower


@pytest.fixture(scope="module")
def convclip(toy):
    """ConvCLIP with its image tower distilled from the toy CLIP's on 1,000 toy:shapes-noisy pool images (8 s):
    features at cosine ~0.96 to the teacher's, though that is not enough to keep its zero-shot accuracy (a few
    points above chance): the test is that every method runs, saves and restores through the subclass API."""
    torch.manual_seed(0)
    backbone = ConvCLIP(toy)
    pool = load_dataset("toy:shapes-noisy-pool")["train"]
    images = torch.stack([toy.preprocess(pool.image(i)) for i in range(0, len(pool), 4)])  # (1000, 3, 32, 32)
    with torch.no_grad():
        target = toy.encode_images(images)  # (1000, D)
    tower = backbone.model.tower.train()
    opt = torch.optim.AdamW(tower.parameters(), lr=3e-3)
    for _ in range(300):
        idx = torch.randint(len(images), (128,))
        loss = 1 - F.cosine_similarity(tower(images[idx])[0], target[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    tower.eval()
    assert convclip_is_no_vit(backbone)
    return backbone


def convclip_is_no_vit(backbone: Backbone) -> bool:
    return backbone.visual_prompt_site() is None and backbone.visual_blocks() is None


@pytest.mark.parametrize("method_cls", LABEL_FREE, ids=lambda m: m.name)
def test_every_label_free_method_runs_on_a_backbone_that_is_not_a_vit(method_cls, convclip, tmp_path):
    name = method_cls.name
    options = {**FAST_OPTIONS[name], **({"modality": "visual"} if name in ("ifpl", "grip") else {})}
    cfg = RunConfig(method=name, dataset="toy:shapes-noisy", options=options)
    result = run(cfg, backbone=convclip, progress=False, out_dir=tmp_path / name)
    assert 0 <= result.accuracy["test"] <= 100 and result.pseudo_labels
    tuned_with_prompts = name in ("coft", "coft_plus", "lafter", "ifpl", "grip")  # VPT by default on a ViT
    fell_back = [n for n in result.notes if "not a ViT" in n]
    assert bool(fell_back) == tuned_with_prompts, result.notes
    classifier, _ = load_classifier(tmp_path / name / "adapter")  # the fallback is repeated on restore
    images = torch.stack([convclip.preprocess(load_dataset("toy:shapes-noisy")["test"].image(i)) for i in range(8)])
    with torch.no_grad():
        reloaded = classifier.predict_images(convclip, images)
        fitted = result.classifier.predict_images(convclip, images)
    assert torch.allclose(reloaded.float(), fitted.float(), atol=1e-3)


def test_a_backbone_that_does_not_name_its_image_tower_gets_a_one_line_error(convclip):
    class Unnamed(ConvCLIP):
        image_tower = Backbone.image_tower

    unnamed = copy.copy(convclip)
    unnamed.__class__ = Unnamed
    with pytest.raises(VlmtuneError, match=r"override Backbone.image_tower\(\)"):
        run(RunConfig(method="reclip", dataset="toy:shapes-noisy", options=FAST_OPTIONS["reclip"]), backbone=unnamed)
