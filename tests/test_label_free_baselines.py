"""Paper 004's label-free baselines beside LatteCLIP: ReCLIP (label propagation), LaFTer, LMM zero-shot.

The plugin contract of each (fit, determinism, save / load, new class names) is in test_methods_contract.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.conftest import FAST_OPTIONS

from vlmtune.methods.frozen.lmm_zeroshot import match_answer
from vlmtune.methods.labelfree.propagation import default_cut, diffuse, knn_graph, projection, propagate
from vlmtune.runs.runner import RunConfig, run
from vlmtune.textgen.backends.toy import ToyBackend
from vlmtune.textgen.base import GenRequest


def _clusters(k: int = 4, per: int = 30, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class embeddings (K, D) with a shared direction, and N images around them (N, D), labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    shared = F.normalize(torch.randn(d, generator=g), dim=0)
    classes = F.normalize(torch.randn(k, d, generator=g) + 3 * shared, dim=-1)
    labels = torch.arange(k).repeat_interleave(per)
    feats = F.normalize(classes[labels] + 0.25 * torch.randn(k * per, d, generator=g), dim=-1)
    return classes, feats, labels


def test_projection_drops_the_first_direction_of_the_class_matrix():
    classes, _, _ = _clusters()
    p = projection(classes, default_cut(4))
    u = torch.linalg.svd(classes.T, full_matrices=False)[0]  # (D, K)
    torch.testing.assert_close(p, p.T)
    torch.testing.assert_close(p @ p, p, atol=1e-5, rtol=1e-5)  # a projection
    assert float((p @ u[:, 0]).norm()) < 1e-5  # the dominant (shared) direction is removed
    torch.testing.assert_close(p @ u[:, 1:], u[:, 1:], atol=1e-5, rtol=1e-5)  # the others kept
    assert default_cut(1000) == 250 and default_cut(10) == 768


def test_sparse_propagation_matches_the_dense_closed_form():
    """The k-NN graph is built in chunks and diffused by CG; the reference builds a dense N x N affinity. Same
    graph, and CG's answer matches the exact solve of (I - alpha W_n) F = Y."""
    classes, feats, labels = _clusters()
    points = F.normalize(torch.cat([classes, feats]), dim=-1)
    w = knn_graph(points, 5)
    assert (w != w.T).nnz == 0  # symmetric
    dense_a = (points @ points.T + 1) / 2 * (1 - torch.eye(len(points)))
    top = dense_a.topk(5, dim=1)
    expected = torch.zeros_like(dense_a).scatter(1, top.indices, top.values)
    torch.testing.assert_close(torch.from_numpy(w.toarray()).float(), (expected + expected.T) / 2)
    seeds = np.zeros((len(points), 4))
    seeds[np.arange(4), np.arange(4)] = 1
    got = diffuse(w, seeds, 0.99, 500)
    d = np.asarray(w.sum(1)).ravel() ** -0.5
    system = np.eye(len(points)) - 0.99 * (d[:, None] * w.toarray() * d[None, :])
    np.testing.assert_allclose(got, np.linalg.solve(system, seeds), rtol=1e-4, atol=1e-6)
    result = propagate(classes, feats, projection(classes, 768), neighbors=10)
    assert float((result.labels == labels).float().mean()) > 0.95
    assert result.centroids.shape == classes.shape
    assert torch.allclose(result.centroids.norm(dim=-1), torch.ones(4))
    assert ((result.confidence >= 0) & (result.confidence <= 1)).all()


def test_reclip_reports_both_models_and_their_agreement(toy):
    cfg = RunConfig(method="reclip", dataset="toy:shapes-noisy", options=FAST_OPTIONS["reclip"])
    result = run(cfg, progress=False, backbone=toy)
    sources = {(p["round"], p["kind"], p["source"]) for p in result.pseudo_labels}
    assert {(0, "all", "ReCLIP-T"), (0, "all", "ReCLIP-V"), (0, "selected", "agreeing")} <= sources
    assert result.accuracy["test"] > 20  # toy:shapes-noisy, 10 classes


def test_match_answer_exact_contained_close_or_none():
    names = ["solid circle", "striped circle", "star", "Yorkshire terrier"]
    assert match_answer("Striped circle.", names) == 1
    assert match_answer("It is a striped circle on grey.", names) == 1  # the longest name it contains
    assert match_answer("yorkshire terier", names) == 3  # a typo: the closest
    assert match_answer("a sketch", names) is None


def test_toy_likelihoods_rank_the_class_it_sees(toy_gen_backend):
    from vlmtune import load_dataset

    test = load_dataset("toy:shapes")["test"]
    names = test.classnames
    scores = torch.tensor(
        toy_gen_backend.score(
            [GenRequest("Which?", test.image(i)) for i in range(40)], [f"a photo of a {c}." for c in names]
        )
    )  # (40, K)
    assert scores.shape == (40, len(names)) and torch.isfinite(scores).all() and (scores < 0).all()
    assert float((scores.argmax(1) == torch.as_tensor(test.labels[:40])).float().mean()) > 0.8


@pytest.fixture(scope="module")
def toy_gen_backend():
    return ToyBackend()


def test_lmm_zeroshot_says_it_ranks_by_likelihood_and_answers_on_request(toy, tmp_path):
    ranked = run(RunConfig(method="lmm_zeroshot", dataset="toy:shapes"), progress=False, backbone=toy)
    assert any("log-likelihood" in n for n in ranked.notes) and ranked.accuracy["test"] > 80
    asked = run(
        RunConfig(method="lmm_zeroshot", dataset="toy:shapes", options={"mode": "answer"}), progress=False, backbone=toy
    )
    assert not asked.notes and asked.accuracy["test"] > 80  # the describer's caption names the shape it sees


def test_lafter_text_classifier_then_visual_prompts(toy):
    cfg = RunConfig(
        method="lafter", dataset="toy:shapes", options={**FAST_OPTIONS["lafter"], "descriptions": "generate"}
    )
    result = run(cfg, progress=False, backbone=toy)
    first = next(p for p in result.pseudo_labels if p["source"] == "text classifier")
    assert first["round"] == 0 and first["accuracy"] > 50  # the text-only classifier already names photos
    assert result.accuracy["test"] > 50
