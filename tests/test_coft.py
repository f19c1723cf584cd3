"""CoFT / CoFT+ (paper 003): the dual loss (Eq. 4-6, both readings of Eq. 5), the collaborative filter, the
pipeline's diagnostics and adapters, the ablations, CoFT+'s rounds / momentum contrast / descriptions."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import FAST_COFT

from vlmtune import load_dataset
from vlmtune.errors import VlmtuneError
from vlmtune.methods.common.text import read_descriptions
from vlmtune.methods.labelfree.coft.methods import ABLATIONS, CoFTClassifier
from vlmtune.methods.labelfree.coft.phases import (
    DualLoss,
    Encoded,
    collaborative_filter,
    dual_loss,
    fft_contrast_loss,
)
from vlmtune.methods.registry import get_method, load_classifier, make_config
from vlmtune.runs.runner import RunConfig, run, score_split


def _features(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1).requires_grad_()
    pos = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1).requires_grad_()
    neg = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1).requires_grad_()
    return feats, pos, neg, torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([1, 2, 3, 0, 2, 3])


@pytest.mark.parametrize("eq5", ["consistent", "literal"])
def test_dual_loss_is_l1_plus_lambda_l2_as_written(eq5):
    feats, pos, neg, y, y_hat = _features()
    s, lam = 10.0, 0.7
    got = dual_loss(feats, pos, neg, y, y_hat, s, DualLoss(lam, eq5))
    rows = torch.arange(6)
    lp, ln = s * feats @ pos.T, s * feats @ neg.T
    l1 = -(lp.log_softmax(1)[rows, y]).mean()  # Eq. (4)
    neg_y, neg_hat = (ln[rows, y], ln[rows, y_hat]) if eq5 == "consistent" else (ln[rows, y_hat], ln[rows, y])
    p_y = lp[rows, y].exp() / (lp[rows, y].exp() + neg_y.exp())  # Eq. (5)
    p_hat = lp[rows, y_hat].exp() / (lp[rows, y_hat].exp() + neg_hat.exp())
    l2 = -(p_y.log() + (1 - p_hat).log()).mean()  # Eq. (6)
    torch.testing.assert_close(got, l1 + lam * l2)
    assert not torch.allclose(dual_loss(feats, pos, neg, y, y_hat, s, DualLoss(0.0)), got)


def test_dual_loss_gradients_follow_the_detach_options():
    feats, pos, neg, y, y_hat = _features(1)

    def grads(rule):
        for t in (feats, pos, neg):
            t.grad = None
        l1 = dual_loss(feats, pos, neg, y, y_hat, 10.0, DualLoss(0.0))
        (dual_loss(feats, pos, neg, y, y_hat, 10.0, rule) - l1).backward()  # L2's gradients alone
        return [None if t.grad is None else float(t.grad.abs().sum()) for t in (feats, pos, neg)]

    g_img, g_pos, g_neg = grads(DualLoss())  # default: positive logits detached, image attached
    assert g_img > 0 and not g_pos and g_neg > 0
    g_img, g_pos, _ = grads(DualLoss(detach_positive=False, detach_image=True))  # DeFT detaches the image
    assert not g_img and g_pos > 0


def test_collaborative_filter_keeps_what_the_other_models_dual_prompts_accept():
    e = torch.eye(3)
    labeller = Encoded(feats=e, positive=e, negative=-e, scale=1.0)  # labels 0, 1, 2
    # the validator's negative prompt beats its positive one for class 1 only
    validator = Encoded(feats=e, positive=e * 0.5, negative=torch.diag(torch.tensor([0.0, 0.9, 0.0])), scale=1.0)
    labels, margin = collaborative_filter(labeller, validator)
    assert labels.tolist() == [0, 1, 2] and (margin > 0).tolist() == [True, False, True]
    assert torch.allclose(margin, torch.tensor([0.5, 0.5 - 0.9, 0.5]))  # cos(v, t+(y)) - cos(v, t-(y))
    confident = Encoded(feats=e, positive=e * 3, negative=e, scale=1.0)
    _, by_confidence = collaborative_filter(labeller, confident, confidence=0.99)
    assert (by_confidence > 0).tolist() == [False, False, False]  # softmax of (3, 0, 0) is 0.91
    _, by_confidence = collaborative_filter(labeller, confident, confidence=0.9)
    assert (by_confidence > 0).tolist() == [True, True, True]


def test_coft_filter_keeps_more_than_top_k_and_cleaner_than_the_labeller_and_the_adapter_round_trips(toy, tmp_path):
    """Reduced evidence (full size: test_coft_evidence.py): on toy:toynet-noisy with a short schedule, each clean set
    is larger than S* and more accurate than its labeller's labels of all images, both measured by the runner."""
    out = tmp_path / "run"
    options = {**FAST_COFT, "shots": 16, "n_ctx": 8, "peft_epochs": 8, "fft_epochs": 1, "final": "average"}
    res = run(RunConfig(method="coft", dataset="toy:toynet-noisy", options=options), out, backbone=toy, progress=False)
    rows = {(r["round"], r["kind"], r.get("source", "")): r for r in res.pseudo_labels}
    for m in ("model 1", "model 2"):
        selected, labelled, clean = rows[1, "selected", m], rows[1, "all", m], rows[1, "clean", m]
        assert selected["n"] <= 20 * 16 and selected["per_class_max"] <= 16  # S*: top-K per class
        assert clean["n"] > selected["n"] and clean["accuracy"] > labelled["accuracy"]
    assert (out / "pseudo_labels.jsonl").is_file()
    clf, meta = load_classifier(out / "adapter")
    assert meta["classifier"] == "CoFTClassifier" and len(clf.members) == 2
    assert {k.split(".")[0] for k in clf.extra_tensors()} == {"member0", "member1"}  # two fine-tuned towers
    assert score_split(clf, toy, load_dataset("toy:toynet-noisy")["test"], None, False) == res.accuracy["test"]


def _zero_shot(toy, dataset: str) -> float:
    return run(RunConfig(method="zeroshot", dataset=dataset), backbone=toy, progress=False).accuracy["test"]


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_each_ablation_runs_as_a_preset(ablation, toy):
    cfg = make_config(get_method("coft"), {"preset": ablation})
    assert all(getattr(cfg, k) == v for k, v in ABLATIONS[ablation].items())
    res = run(
        RunConfig(method="coft", dataset="toy:shapes", options={"preset": ablation, **FAST_COFT}),
        backbone=toy,
        progress=False,
    )
    # toy:shapes is easy (zero-shot 96.8): a short CoFT must stay near it (measured 97.0 for every preset)
    assert res.accuracy["test"] >= _zero_shot(toy, "toy:shapes") - 3
    kinds = [r["kind"] for r in res.pseudo_labels]
    assert ("clean" in kinds) == (ablation != "peft-only")
    sources = {r.get("source") for r in res.pseudo_labels if r["kind"] == "selected"}
    assert len(sources) == (1 if ablation == "one-model" else 2)


def test_no_vpt_without_phase_two_is_refused_with_one_line(toy):
    with pytest.raises(VlmtuneError, match="vpt=none with phase2=false"):
        run(
            RunConfig(method="coft", dataset="toy:shapes", options={**FAST_COFT, "vpt": "none", "phase2": False}),
            backbone=toy,
            progress=False,
        )


def test_coft_plus_runs_rounds_with_momentum_contrast_and_descriptions(toy, tmp_path):
    names = load_dataset("toy:shapes")["test"].classnames
    path = tmp_path / "descriptions.json"
    path.write_text(json.dumps({n: [f"a photo of a {n}.", f"a {n} shape."] for n in names}))
    options = {**FAST_COFT, "descriptions": str(path), "rounds": 2}
    res = run(RunConfig(method="coft_plus", dataset="toy:shapes", options=options), backbone=toy, progress=False)
    rounds = sorted({r["round"] for r in res.pseudo_labels if r["kind"] == "selected"})
    assert rounds == [1, 2]  # R rounds of Phase I, each on its own top-K
    assert res.accuracy["test"] >= _zero_shot(toy, "toy:shapes") - 5
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"circle": ["a circle."]}))
    with pytest.raises(VlmtuneError, match="no sentence for 9 class"):
        run(
            RunConfig(method="coft_plus", dataset="toy:shapes", options={**FAST_COFT, "descriptions": str(missing)}),
            backbone=toy,
            progress=False,
        )


@pytest.mark.parametrize("text", ["{not json", '{"a": "one sentence"}', "[]"])
def test_descriptions_files_are_checked(tmp_path, text):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(VlmtuneError, match="descriptions file"):
        read_descriptions(path)


def test_fft_loss_is_eq7_on_the_clean_images_plus_gamma_times_eq9():
    g = torch.Generator().manual_seed(3)
    logits, contrast = torch.randn(5, 4, generator=g), torch.randn(5, 7, generator=g)  # (B, K), (B, 1 + Q)
    y = torch.tensor([2, -1, 0, -1, 3])  # -1: not in the clean set
    clean = y >= 0
    l_fft = -(logits.log_softmax(1)[clean.nonzero()[:, 0], y[clean]]).mean()  # Eq. (7): mean CE over clean only
    l_cont = -(contrast.log_softmax(1)[:, 0]).mean()  # Eq. (9): the positive key is column 0
    for gamma in (0.0, 1.0, 0.3):
        torch.testing.assert_close(fft_contrast_loss(logits, y, contrast, gamma), l_fft + gamma * l_cont)  # Eq. (10)
    none = torch.full((5,), -1)
    torch.testing.assert_close(fft_contrast_loss(logits, none, contrast, 1.0), l_cont)  # no clean image: L_cont only


class _Member(torch.nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = w

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return 10 * f @ self.w.T


def test_the_final_prediction_averages_both_models_probabilities():
    g = torch.Generator().manual_seed(4)
    w1, w2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    f1 = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    f2 = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    ens = CoFTClassifier(["a", "b", "c"], [_Member(w1), _Member(w2)])  # type: ignore[list-item]
    expected = ((10 * f1 @ w1.T).softmax(1) + (10 * f2 @ w2.T).softmax(1)) / 2  # (N, K)
    got = ens.logits(torch.cat([3 * f1, 0.5 * f2], 1))  # each member's features are normalised on their own
    torch.testing.assert_close(got.exp(), expected)
