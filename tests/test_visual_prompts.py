"""Visual prompt tokens (CraFT + vp, paper 001 App. B): backbones, the black box, and the method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmtune import load_backbone, load_dataset
from vlmtune.blackbox.api import PredictRequest, QueryBudget
from vlmtune.blackbox.local import LocalBlackBox
from vlmtune.methods.api import Task
from vlmtune.methods.registry import get_method, load_classifier, make_config
from vlmtune.runs.runner import RunConfig, run, upload_split


def _check_prompted(backbone, size: int) -> None:
    images = torch.randn(3, 3, size, size)
    width = backbone.visual_width
    prompts = torch.randn(2, 5, width)
    with torch.no_grad():
        out = backbone.encode_images_prompted(images, prompts)  # (C, B, D)
        single = backbone.encode_images_prompted(images[1:2], prompts[1:2])
        plain = backbone.encode_images(images)
    assert out.shape == (2, 3, backbone.embed_dim)
    torch.testing.assert_close(single[0, 0], out[1, 1], atol=1e-5, rtol=1e-5)  # batching changes nothing
    assert (out[0] - out[1]).abs().max() > 1e-3  # the tokens reach the pooled feature
    assert (out[0] - plain).abs().max() > 1e-3
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 3))
    with torch.no_grad():  # the hook is gone afterwards
        torch.testing.assert_close(backbone.encode_images(images), plain)


def test_toy_backbone_takes_visual_prompts(toy):
    assert toy.visual_width == 128
    _check_prompted(toy, 32)


def test_openclip_vit_takes_visual_prompts_and_resnet_refuses(openclip_tiny):
    vit = load_backbone("openclip:vlmtune-tiny-vit", cache=False)
    _check_prompted(vit, 32)
    rn = load_backbone("openclip:vlmtune-tiny-rn", cache=False)
    assert rn.visual_width is None
    with pytest.raises(TypeError):
        rn.encode_images_prompted(torch.randn(1, 3, 64, 64), torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="ViT"):
        LocalBlackBox(rn, visual_prompts=True)


def test_box_scores_each_candidate_with_its_own_visual_tokens(toy):
    test = load_dataset("toy:shapes")["test"]
    box = LocalBlackBox(toy, visual_prompts=True, image_batch=4)  # several image forwards per candidate
    refs = upload_split(box, test.subset(list(range(0, 100, 10))), False)
    vis = np.random.default_rng(0).normal(0, 1, (3, 2, 128)).astype(np.float32)
    scores = box.predict(PredictRequest(refs.ids, test.classnames, visual_contexts=vis))
    assert scores.shape == (3, 10, 10) and box.usage().used == 3
    one = box.predict(PredictRequest(refs.ids, test.classnames, visual_contexts=vis[2:]))
    np.testing.assert_allclose(one[0], scores[2], atol=1e-4)
    with pytest.raises(ValueError, match="visual"):  # a box started without visual prompts refuses them
        PredictRequest(refs.ids, test.classnames, visual_contexts=vis).validate(LocalBlackBox(toy).info())


def test_craft_with_visual_prompts_runs_saves_and_predicts(toy, tmp_path):
    opts = {"visual_prompt": True, "budget": 33, "popsize": 10, "subspace": 16, "vp_subspace": 8}
    cfg = RunConfig(method="craft", dataset="toy:shapes-sketch", shots=2, seed=1, options=opts)
    result = run(cfg, out_dir=tmp_path, progress=False, backbone=toy)
    assert result.queries == 33  # 3 generations x (10 candidates + the mean prompt)
    clf, _ = load_classifier(tmp_path / "adapter")
    assert clf.uses_visual_prompts and tuple(clf.visual_context.shape) == (5, 128)
    box = LocalBlackBox(toy, visual_prompts=True)
    refs = upload_split(box, load_dataset("toy:shapes-sketch")["test"].subset(list(range(0, 500, 5))), False)
    torch.testing.assert_close(clf.predict_blackbox(box, refs), result.classifier.predict_blackbox(box, refs))
    with pytest.raises(ValueError, match="visual"):  # a box without visual prompts is refused up front
        task = Task(clf.classnames, ["a photo of a {}."], train=refs)
        get_method("craft")(make_config(get_method("craft"), opts)).fit(
            LocalBlackBox(toy, QueryBudget(None)), task, generator=torch.Generator().manual_seed(0)
        )
