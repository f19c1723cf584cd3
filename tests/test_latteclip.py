"""LatteCLIP (paper 004): Eq. (1)-(2) and the momentum update against hand computations, the runner's dual
pseudo-label diagnostics, the adapter carrying the image tower alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import FAST_OPTIONS
from vlmtune.data import load_dataset
from vlmtune.methods.common.text import class_text_weights
from vlmtune.methods.labelfree.contrastive import clip_loss, epochs_for
from vlmtune.methods.labelfree.latteclip import (
    ABLATIONS,
    LatteCLIPConfig,
    dual_loss,
    fine_tuned_labels,
    mixed_text,
    mixer_weights,
    momentum_update,
    prototype_text,
)
from vlmtune.methods.registry import get_method, make_config
from vlmtune.runs.protocols import final_pseudo_label_accuracy
from vlmtune.runs.runner import FeatureSource, RunConfig, make_task, run


def test_mixer_weight_is_the_gap_between_the_two_closest_prototypes():
    protos = torch.eye(3)  # (K, D)
    text = torch.tensor([[0.8, 0.6, 0.0], [1.0, 1.0, 1.0]])  # (B, D): unit-norm, and equidistant
    w = mixer_weights(text, protos)  # Eq. (1)
    assert torch.allclose(w, torch.tensor([0.8 - 0.6, 0.0]), atol=1e-6)


def test_prototype_text_embedding_blends_weighted_texts_with_the_prototype():
    protos = torch.eye(3)
    labels = torch.tensor([0])
    a, b = torch.tensor([[0.8, 0.6, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])  # weights 0.2 and 1 (+1e-6)
    t = prototype_text(mixed_text([a, b], protos, mixer=True), protos, labels, alpha=0.5)  # Eq. (2)
    wa, wb = 0.2 + 1e-6, 1.0 + 1e-6
    expected = 0.5 * (wa * a + wb * b) / (wa + wb) + 0.5 * protos[0]
    assert torch.allclose(t, expected, atol=1e-6)
    flat = prototype_text(mixed_text([a, b], protos, mixer=False), protos, labels, alpha=0.5)  # no mixer: plain mean
    assert torch.allclose(flat, 0.5 * (a + b) / 2 + 0.5 * protos[0])


def test_momentum_update_moves_only_the_batch_classes_towards_their_mean():
    protos = torch.eye(3)
    labels = torch.tensor([0, 0, 2])
    embeds = torch.tensor([[0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.0]])
    momentum_update(protos, labels, embeds, mu=0.9, normalize=False)
    assert torch.allclose(protos[0], torch.tensor([0.9, 0.2, 0.0]))  # 0.1 * mean(0, 2, 0) + 0.9 * e0
    assert torch.allclose(protos[1], torch.tensor([0.0, 1.0, 0.0]))  # untouched
    assert torch.allclose(protos[2], torch.tensor([0.1, 0.0, 0.9]))
    momentum_update(protos, labels, embeds, mu=0.9, normalize=True)  # the reference code renormalises
    assert torch.allclose(protos[[0, 2]].norm(dim=-1), torch.ones(2))


def test_clip_loss_is_symmetric_and_small_for_matching_pairs():
    x = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert clip_loss(x, x, 100.0) < 1e-3 < clip_loss(x, x.roll(1, 0), 100.0)
    assert torch.isclose(clip_loss(x, x.flip(0), 10.0), clip_loss(x.flip(0), x, 10.0))


def test_training_length_is_min_of_iterations_and_epochs():
    assert epochs_for(4000, 512, 2000, 50) == 50  # 8 steps an epoch: 50 epochs (400 steps) come first
    assert epochs_for(50000, 512, 2000, 50) == 21  # 98 steps an epoch: 2000 steps take 21 epochs
    assert set(ABLATIONS) >= {"no-mixer", "no-zs", "no-ft", "no-momentum", "class-only", "reference"}


def test_runner_reports_both_pseudo_labels_and_the_adapter_carries_the_image_tower_only(toy):
    options = {**FAST_OPTIONS["latteclip"], "texts": "class+image+group"}
    # 28 labelled shots per class leave 40 unlabelled images to describe (LatteCLIP trains on those alone)
    cfg = RunConfig(method="latteclip", dataset="toy:shapes", shots=28, options=options)
    result = run(cfg, backbone=toy, progress=False)
    sources = {row["source"] for row in result.pseudo_labels}
    assert {"zero-shot", "fine-tuned"} <= sources
    zs = next(r for r in result.pseudo_labels if r["source"] == "zero-shot")
    assert zs["n"] == 40 and 0 <= zs["accuracy"] <= 100
    tower = result.classifier.tower
    text_keys = [k for k in tower if k.startswith(("text.", "transformer.", "token_embedding"))]
    assert tower and not text_keys  # the text tower's training ends in the prototypes
    # 3 steps at lr 1e-5 barely move the towers: the run must score like zero-shot (measured 96.8 for both)
    zero_shot = run(RunConfig(method="zeroshot", dataset="toy:shapes"), backbone=toy, progress=False)
    assert abs(result.accuracy["test"] - zero_shot.accuracy["test"]) <= 2


def test_table3_momentum_rows_move_the_prototypes_as_the_paper_describes(toy):
    """mu = 0.99 on t (alpha = 0.99 inside it) moves p_c by about 1e-4 of the way to the texts per update, below
    float32's resolution of a cosine after 3 steps; Table 3's 'w/o momentum update' (mu = 0, p_c <- the weighted
    texts) replaces it; fixed prototypes stay at T^class. The cost of the ablation at full size (>= 10 points) is
    in test_latteclip_evidence.py."""
    splits = load_dataset("toy:shapes")
    source = FeatureSource(toy, None, progress=False)
    options = {**FAST_OPTIONS["latteclip"], "texts": "class+image"}
    task, _ = make_task(splits, source, RunConfig(method="latteclip", dataset="toy:shapes", shots=28, options=options))
    t_class = class_text_weights(toy, task.classnames, ["a photo of a {}."])  # (K, D), the initial prototypes
    drift, moved = {}, {}
    for preset in ("", "no-momentum", "fixed-prototypes"):
        method = get_method("latteclip")
        config = make_config(method, {**options, **({"preset": preset} if preset else {})})
        clf = method(config).fit(toy, task, generator=torch.Generator().manual_seed(1))
        protos = clf.weight.detach()  # (K, D)
        drift[preset] = 1 - F.cosine_similarity(protos, t_class, dim=-1).min().item()  # the class that moved most
        moved[preset] = (protos - t_class).abs().max().item()  # the largest change of one coordinate
    assert moved["fixed-prototypes"] == 0.0 and drift["fixed-prototypes"] < 1e-6
    # the momentum update happens (a test that passes without any update is no test) and stays tiny
    assert 1e-6 < moved[""] < 1e-2 and drift[""] < 1e-5, moved
    assert drift["no-momentum"] > 0.05, drift  # measured 0.28


def test_protocol_tables_report_the_fine_tuned_models_last_labels():
    """The unsupervised table's pseudo-label column: the last selected / clean sets where a method selects (UPL,
    CoFT), else the last relabelling of all images by the model being trained (LatteCLIP, FLYP + PL, ReCLIP)."""

    def row(rnd, kind, acc, source=None):
        return {"round": rnd, "kind": kind, "accuracy": acc, "source": source}

    contrastive = [
        row(0, "all", 80.0, "zero-shot"),
        row(1, "all", 81.0, "fine-tuned"),
        row(2, "all", 83.0, "fine-tuned"),
    ]
    assert final_pseudo_label_accuracy(contrastive) == 83.0
    assert final_pseudo_label_accuracy(contrastive[:1]) is None  # the frozen model's labels are not trained ones
    reclip = [row(1, "all", 70.0, "ReCLIP-T"), row(1, "all", 60.0, "ReCLIP-V")]
    assert final_pseudo_label_accuracy(reclip) == 65.0
    assert final_pseudo_label_accuracy([*reclip, row(1, "selected", 90.0, "agreeing")]) == 90.0


def test_c_ft_is_the_nearest_prototype_and_the_loss_is_l_zs_plus_l_ft():
    g = torch.Generator().manual_seed(5)
    protos = torch.randn(4, 8, generator=g) * 3  # (K, D), not normalised (the momentum update leaves them so)
    f = F.normalize(torch.randn(6, 8, generator=g), dim=-1)  # (B, D)
    c_ft = fine_tuned_labels(f, protos)
    cos = f @ F.normalize(protos, dim=-1).T
    assert torch.equal(c_ft, cos.argmax(1))
    c_zs = (c_ft + 1) % 4  # disagreeing labels: the two terms differ
    g_class = F.normalize(torch.randn(4, 8, generator=g), dim=-1)  # T^class features (K, D)
    shared = [F.normalize(torch.randn(6, 8, generator=g), dim=-1)]  # T^image (B, D)

    def term(labels):
        t = prototype_text(mixed_text([g_class[labels], *shared], protos, True), protos, labels, 0.9)  # Eq. (1)-(2)
        return clip_loss(f, t, 50.0)  # Eq. (3)

    both = LatteCLIPConfig(alpha=0.9)
    total, moved = dual_loss(f, c_zs, c_ft, g_class, shared, protos, both, 50.0)
    torch.testing.assert_close(total, term(c_zs) + term(c_ft))  # L_zs + L_ft, summed (Sec. 3.3)
    assert [torch.equal(lab, ref) for (lab, _), ref in zip(moved, (c_zs, c_ft), strict=True)] == [True, True]
    zs_only, moved = dual_loss(f, c_zs, c_ft, g_class, shared, protos, LatteCLIPConfig(alpha=0.9, use_ft=False), 50.0)
    torch.testing.assert_close(zs_only, term(c_zs))
    assert len(moved) == 1
    ft_only, _ = dual_loss(f, c_zs, c_ft, g_class, shared, protos, LatteCLIPConfig(alpha=0.9, use_zs=False), 50.0)
    torch.testing.assert_close(ft_only, term(c_ft))
