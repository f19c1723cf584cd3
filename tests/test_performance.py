"""Performance paths give the results of the plain paths (issue 14): shared-prefix text encoding, bf16 copies,
bounded text passes, replies split within the box's limits, cluster executors. Speed itself is measured in
``benchmarks/``, never asserted here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmtune import load_backbone
from vlmtune.backbones.prefix import resolve_precision, shared_prefix_length
from vlmtune.blackbox.api import ImageRefs, PredictRequest, QueryBudget, ServiceLimits
from vlmtune.blackbox.local import LocalBlackBox
from vlmtune.data import load_dataset
from vlmtune.errors import VlmtuneError
from vlmtune.methods.api import Task
from vlmtune.methods.blackbox.base import query_scores, score_parts
from vlmtune.methods.registry import get_method, make_config

NAMES = ["circle", "square", "triangle", "star", "cross", "red circle", "big blue square"]


def _prompts(bb, template="a photo of a {}.", names=NAMES, c=3, seed=0):
    """Token embeddings (c, K, L, W) of ``names`` under c random contexts, the EOT positions and shared length."""
    tokens = bb.tokenize([template.format(n) for n in names])
    eot = bb.eot_index(tokens)
    tokens = tokens[:, : int(eot.max()) + 1]
    base = bb.embed_tokens(tokens).float()
    ctx = torch.randn(c, 4, bb.token_width, generator=torch.Generator().manual_seed(seed)) * 0.05
    embeds = base.expand(c, *base.shape).clone()
    embeds[:, :, 1:5] += ctx[:, None]
    return embeds, eot, shared_prefix_length(tokens, eot)


@torch.no_grad()
def _check_shared_prefix(bb):
    embeds, eot, p = _prompts(bb)
    c, k, length, w = embeds.shape
    assert 5 <= p < int(eot.min()) + 1  # [SOT, a photo of a] at least
    whole = bb.encode_text_embeddings(embeds.reshape(c * k, length, w), eot.repeat(c)).view(c, k, -1)
    shared = bb.encode_text_shared_prefix(embeds[:, 0, :p], embeds[:, :, p:], eot)
    assert shared.shape == whole.shape
    torch.testing.assert_close(shared, whole, atol=2e-6, rtol=1e-5)


def test_shared_prefix_equals_whole_prompts_toy(toy):
    assert toy.text_stack() is not None
    _check_shared_prefix(toy)


@pytest.mark.parametrize("arch", ["vlmtune-tiny-vit", "vlmtune-tiny-rn"])
def test_shared_prefix_equals_whole_prompts_openclip(openclip_tiny, arch):
    bb = load_backbone(f"openclip:{arch}")
    assert bb.text_stack() is not None
    _check_shared_prefix(bb)


def test_shared_prefix_equals_whole_prompts_hf(hf_tiny):
    bb = load_backbone(f"hf:{hf_tiny[0]}", cache=False)
    assert bb.text_stack() is not None
    _check_shared_prefix(bb)


def test_shared_prefix_falls_back_to_whole_prompts(toy, monkeypatch):
    """A tower without a ``text_stack`` is encoded whole: same results, no saving."""
    monkeypatch.setattr(type(toy), "text_stack", lambda self: None)
    _check_shared_prefix(toy)


def test_shared_prefix_length_stops_before_the_first_class_token(toy):
    tokens = toy.tokenize(["a photo of a circle.", "a photo of a square."])
    eot = toy.eot_index(tokens)
    assert shared_prefix_length(tokens, eot) == 5  # SOT + 4 words
    assert shared_prefix_length(tokens[:1], eot[:1]) == int(eot[0])  # one prompt: all of it but its EOT


def _box_scores(toy, names=NAMES, **kwargs):
    box = LocalBlackBox(toy, **kwargs)
    split = load_dataset("toy:shapes")["test"]
    ids = box.upload_images([split.image(i) for i in range(12)])
    ctx = np.random.default_rng(0).normal(0, 0.05, (10, 4, toy.token_width)).astype(np.float32)
    return box, box.predict(PredictRequest(ids, names, "a photo of a {}.", ctx))


def test_box_scores_equal_with_and_without_prefix_sharing_and_pass_bounds(toy):
    _, plain = _box_scores(toy, share_prefix=False)
    box, shared = _box_scores(toy, max_sequences=3 * len(NAMES))  # 3 candidates per text pass
    np.testing.assert_allclose(shared, plain, rtol=1e-5, atol=1e-4)
    assert box.forwards == 4  # ceil(10 / 3) bounded passes


def test_bf16_box_is_a_cast_copy_close_to_fp32(toy):
    _, fp32 = _box_scores(toy)
    box, bf16 = _box_scores(toy, precision="bf16")
    assert box._backbone is not toy and box._backbone.dtype == torch.bfloat16 and toy.dtype == torch.float32
    assert box._backbone.fingerprint() != toy.fingerprint()  # feature-cache keys tell the precisions apart
    assert np.abs(bf16 - fp32).max() < 0.05 * np.abs(fp32).max()
    assert (bf16.argmax(-1) == fp32.argmax(-1)).mean() > 0.95
    assert toy.cast(torch.float32) is toy


def test_bf16_image_features_keep_their_direction(toy):
    split = load_dataset("toy:shapes")["test"]
    images = torch.stack([toy.preprocess(split.image(i)) for i in range(16)])
    with torch.no_grad():
        cos = F.cosine_similarity(toy.cast(torch.bfloat16).encode_images(images).float(), toy.encode_images(images))
    assert cos.min() > 0.999


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    assert resolve_precision("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": False})
    assert resolve_precision("auto", "cpu") == torch.float32
    assert resolve_precision("bf16", "cpu") == torch.bfloat16 and resolve_precision("fp32", "cpu") == torch.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")  # type: ignore[arg-type]


def _craft_setup(toy, limits=None):
    split = load_dataset("toy:shapes")["train"]
    idx = list(range(60))
    box = LocalBlackBox(toy, QueryBudget(None), limits=limits)
    refs = ImageRefs(box.upload_images([split.image(i) for i in idx]), torch.as_tensor(split.labels[idx]))
    return box, Task(split.classnames, split.templates, train=refs)


def test_replies_split_within_the_box_limits_give_the_same_scores_and_fitness(toy):
    """40 candidates x 60 images x 5 classes: one request on a roomy box; on a box that takes 25 images and
    1,000 reply values a request, 3 image parts x 7 candidate groups, each charged (3 queries per candidate)."""
    roomy, task = _craft_setup(toy)
    tight, task_t = _craft_setup(toy, ServiceLimits(max_images=25, max_reply_values=1000, max_candidates=40))
    ctx = np.random.default_rng(1).normal(0, 0.05, (40, 4, toy.token_width)).astype(np.float32)
    parts = list(score_parts(tight, task_t.train.ids, task.classnames, "a photo of a {}.", ctx))
    assert max(p.scores.numel() for p in parts) <= 1000 and len({p.images.start for p in parts}) == 3
    assert tight.usage().used == 40 * 3
    full = query_scores(roomy, task.train, task.classnames, "a photo of a {}.", ctx)
    torch.testing.assert_close(query_scores(tight, task_t.train, task.classnames, "a photo of a {}.", ctx), full)

    craft = get_method("craft")
    fitness = {}
    for name, (box, t) in {"roomy": (roomy, task), "tight": (tight, task_t)}.items():
        m = craft(make_config(craft, {"budget": 246, "subspace": 8}))
        steps = []
        m.hooks.on_step = lambda step, total, unit, metrics, steps=steps: steps.append(metrics)
        before = box.usage().used
        m.fit(box, t, generator=torch.Generator().manual_seed(0))
        fitness[name] = (steps[0]["fitness"], box.usage().used - before)
    assert fitness["tight"][0] == pytest.approx(fitness["roomy"][0], rel=1e-6)
    assert fitness["roomy"][1] == fitness["tight"][1] == 246  # 6 generations, or 2 of 3 parts each


def test_protocol_jobs_on_submitit_local_equal_local_workers(tmp_path):
    """``--executor local``: the jobs run as submitit subprocesses (the engine's test mode for SLURM) and give the
    results of this process's own loop."""
    pytest.importorskip("submitit")
    from vlmtune.runs.protocols import ProtocolSettings, few_shot_sweep

    args = (["zeroshot", "linear_probe"], "toy:shapes-sketch", [1, 2], [1])
    here = few_shot_sweep(*args, ProtocolSettings(progress=False))
    engine = ProtocolSettings(progress=False, executor="local", jobs=2, out=tmp_path)
    there = few_shot_sweep(*args, engine)
    assert there.rows == here.rows and len(here.rows) == 4
    assert any((tmp_path / "executor").iterdir())  # the engine's logs
    with pytest.raises(VlmtuneError, match="--executor-set"):
        few_shot_sweep(*args, ProtocolSettings(progress=False, executor="local", executor_options={"bogus": 1}))


def test_patch_features_are_held_in_float16_and_score_as_in_float32(toy):
    """TMM's patch features (the largest tensor of a run: 10 GB instead of 20 GB for 50,000 images at ViT-B/16)
    are stored in float16; the scorer casts a pass at a time and gives the logits of float32 patches."""
    from vlmtune.features import extract_features
    from vlmtune.methods.prompt.tmm import TMMClassifier

    split = load_dataset("toy:shapes")["test"].subset(list(range(24)))
    data = extract_features(toy, split, patches=True, progress=False)
    assert data.patches is not None and data.patches.dtype == torch.float16 and data.features.dtype == torch.float32
    images = torch.stack([toy.preprocess(split.image(i)) for i in range(len(split))])
    with torch.no_grad():
        pooled, patches = toy.encode_image_tokens(images)  # float32
    torch.testing.assert_close(data.patches.float(), patches, atol=1e-3, rtol=0)
    settings = {"n_ctx": 4, "position": "end", "embed_dim": 128, "width": 128, "lam": 0.2, "scale": 100.0}
    settings |= {"ctp": "attention", "tft": "attention"}
    torch.manual_seed(0)
    clf = TMMClassifier(split.classnames, torch.randn(4, 128) * 0.02, settings).bind(toy)
    half, full = clf._batched(data.features, data.patches), clf._batched(pooled, patches)
    torch.testing.assert_close(half, full, atol=0.05, rtol=0)  # logits at CLIP's scale 100
    assert (half.argmax(-1) == full.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("arch", ["vlmtune-tiny-vit", "vlmtune-tiny-rn"])
def test_bf16_copy_of_an_openclip_tower_keeps_its_features(openclip_tiny, arch):
    """A cast ResNet tower runs in channels_last (what its bf16 kernels want), a ViT keeps its layout; both give
    features close to fp32 (random weights here; benchmarks/feature_precision.py measures ViT-B/32 and RN50)."""
    bb = load_backbone(f"openclip:{arch}")
    half = bb.cast(torch.bfloat16)
    assert half.channels_last == ("rn" in arch) and not bb.channels_last
    size = 32 if "vit" in arch else 64
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cos = F.cosine_similarity(half.encode_images(images).float(), bb.encode_images(images))
    assert cos.min() > 0.99
