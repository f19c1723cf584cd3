"""Full-size evidence for CoFT / CoFT+ on the toy pools (slow: 10-30 minutes per run on one core; the closing note
of issue 11 and docs/methods/coft.md hold the measured tables). The reduced version in the default suite is
test_coft.py::test_coft_filter_keeps_more_than_top_k_and_cleaner_than_the_labeller_and_the_adapter_round_trips."""

from __future__ import annotations

import statistics

import pytest

from vlmtune.runs.runner import RunConfig, run

pytestmark = pytest.mark.slow
SEEDS = (1, 2, 3)
PHOTO = "a photo of a {}."
TASKS = {  # pool -> the pseudo-labelling template (toynet-sketch: the dialect template labels 19.8% correctly)
    "toy:toynet-noisy-pool": "dataset",
    "toy:toynet-sketch-pool": PHOTO,
}


def _acc(toy, cache, method, dataset, seed=1, student=None, backbone=None, **options):
    spec = backbone or "toy"
    cfg = RunConfig(method=method, dataset=dataset, backbone=spec, seed=seed, options=options, student=student, shots=0)
    res = run(cfg, cache=cache, backbone=None if backbone else toy, progress=False)
    return res.accuracy["test"], res.pseudo_labels


def _mean(values):
    return statistics.mean(values)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from vlmtune.features import FeatureCache

    return FeatureCache(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("dataset", sorted(TASKS))
def test_evidence_zero_shot_below_upl_at_most_coft(toy, cache, dataset):
    """Seeds 1-3: zero-shot < UPL <= CoFT on both shifted pools (measured: toynet-noisy 24.9 < 28.3 <= 30.5;
    toynet-sketch with the photo template 81.1 < 84.1 <= 87.3)."""
    template = TASKS[dataset]
    zs = _acc(toy, cache, "zeroshot", dataset, template=template)[0]
    upl = _mean(_acc(toy, cache, "upl", dataset, s, n_ctx=8, template=template)[0] for s in SEEDS)
    coft = _mean(_acc(toy, cache, "coft", dataset, s, n_ctx=8, template=template)[0] for s in SEEDS)
    assert zs < upl <= coft, (zs, upl, coft)


def test_evidence_the_filter_keeps_more_than_top_k_and_cleaner_labels(toy, cache):
    """On toynet-noisy-pool (seed 1), each clean set holds more images than S* and is more accurate than its
    labeller's labels of all images (measured: 2,972 / 3,529 kept vs 270 in S*; 30.8 / 29.1% vs 27.1 / 27.9%)."""
    _, rows = _acc(toy, cache, "coft", "toy:toynet-noisy-pool", 1, n_ctx=8)
    by = {(r["kind"], r.get("source", "")): r for r in rows if r["round"] == 1}
    for m in ("model 1", "model 2"):
        assert by["clean", m]["n"] > by["selected", m]["n"]
        assert by["clean", m]["accuracy"] > by["all", m]["accuracy"]


def test_evidence_coft_ignoring_noisy_labels_beats_a_linear_probe_trained_on_them(toy, cache):
    """toynet-sketch-pool with 40% pair-flip noise: the linear probe trains on the noisy labels (65.5), CoFT ignores
    them and pseudo-labels with the photo template (86.1, seed 1)."""
    noisy = "toy:toynet-sketch-pool@noisy=pairflip-0.4"
    probe = _acc(toy, cache, "linear_probe", noisy)[0]
    coft = _acc(toy, cache, "coft", noisy, 1, n_ctx=8, template=PHOTO)[0]
    assert coft >= probe, (coft, probe)


def test_evidence_a_stronger_teacher_distils_into_the_student(toy, cache):
    """shapes-noisy-pool, seed 1: Phase I on toy, Phase II fine-tunes toy:small, against toy:small's own CoFT."""
    distilled = _acc(toy, cache, "coft", "toy:shapes-noisy-pool", 1, student="toy:small", n_ctx=8)[0]
    alone = _acc(toy, cache, "coft", "toy:shapes-noisy-pool", 1, backbone="toy:small", n_ctx=8)[0]
    assert distilled > alone, (distilled, alone)
