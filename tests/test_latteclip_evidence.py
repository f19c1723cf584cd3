"""Full-size evidence for LatteCLIP (paper 004) on the toy pools, seeds 1-3 (slow: about 5 minutes per LatteCLIP run
on 2 cores; docs/methods/latteclip.md holds the measured tables). Reduced versions in the default suite:
test_latteclip.py (the Table 3 momentum rows' effect on the prototypes, the dual pseudo-label diagnostics).

One schedule for every toy run: batch 256, 160 iterations (10 epochs of a 4,000-image pool), lr 1e-5 (the paper's
1e-7 does not move the toy model in 160 steps); pseudo-labels and T^class with the paper's "a photo of a {}."."""

from __future__ import annotations

import pytest

from vlmtune.runs.protocols import ProtocolResult, ProtocolSettings, unsupervised

pytestmark = pytest.mark.slow
SEEDS = (1, 2, 3)
PHOTO = "a photo of a {}."
SCHEDULE = {"batch_size": 256, "iterations": 160, "lr": 1e-5}
METHODS = {
    "zs-photo=zeroshot": {"template": PHOTO},
    "flyp_pl": SCHEDULE,
    "latteclip": SCHEDULE,
    "no-momentum=latteclip": {**SCHEDULE, "preset": "no-momentum"},
    "class-only=latteclip": {**SCHEDULE, "preset": "class-only"},
}


@pytest.fixture(scope="module")
def sketch(toy, tmp_path_factory) -> ProtocolResult:
    """The unsupervised protocol on toy:toynet-sketch-pool (the shift is in the images: sketches; the photo template
    for every method, so the dialect template plays no part)."""
    from vlmtune.features import FeatureCache

    options = {m.partition("=")[0]: o for m, o in METHODS.items()}
    settings = ProtocolSettings(backbone=toy, cache=FeatureCache(tmp_path_factory.mktemp("cache")), options=options)
    return unsupervised(list(METHODS), "toy:toynet-sketch-pool", SEEDS, settings)


def _mean(result: ProtocolResult, label: str) -> float:
    return result.mean(label, "toy:toynet-sketch-pool", "test")


def test_evidence_zero_shot_below_flyp_pl_at_most_latteclip_and_five_points_over_zero_shot(sketch):
    """Measured (seeds 1-3): zero-shot 81.1 < FLYP + PL <= LatteCLIP, LatteCLIP >= zero-shot + 5 (Table 1's order).
    On the noisy and pixel-art pools, and on shapes-sketch at 94.6 zero-shot, the toy world disagrees (both
    fine-tuners end at or below zero-shot: docs/methods/latteclip.md)."""
    zs, flyp, latte = (_mean(sketch, m) for m in ("zs-photo", "flyp_pl", "latteclip"))
    assert zs < flyp <= latte, (zs, flyp, latte)
    assert latte >= zs + 5, (zs, latte)


def test_evidence_removing_the_momentum_update_costs_ten_points(sketch):
    """Table 3's 'w/o momentum update' (mu = 0, the prototypes replaced by the batch's weighted texts)."""
    assert _mean(sketch, "no-momentum") <= _mean(sketch, "latteclip") - 10


def test_evidence_all_three_text_types_at_least_class_only_minus_half_a_point(sketch):
    """Table 2, row 1 vs row 3 (paper: 72.23 vs 70.67)."""
    assert _mean(sketch, "latteclip") >= _mean(sketch, "class-only") - 0.5
