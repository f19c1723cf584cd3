"""The black-box boundary: budgets are hard and atomic, requests are validated, outputs are detached arrays."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from vlmtune.blackbox.api import BudgetExceeded, PredictRequest, QueryBudget
from vlmtune.blackbox.local import LocalBlackBox
from vlmtune.data import load_dataset
from vlmtune.methods.common.text import class_text_weights


@pytest.fixture(scope="module")
def box_and_ids(toy):
    box = LocalBlackBox(toy, QueryBudget(50))
    test = load_dataset("toy:shapes")["test"]
    ids = box.upload_images([test.image(i) for i in range(0, 500, 25)])  # 20 images
    return box, ids, test.classnames


def test_budget_is_atomic_under_threads():
    budget = QueryBudget(1000)
    errors = []

    def worker():
        for _ in range(200):
            try:
                budget.charge(3)
            except BudgetExceeded:
                errors.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.used == 999 and len(errors) == 8 * 200 - 333
    with pytest.raises(BudgetExceeded):
        budget.charge(2)
    assert budget.used == 999


def test_upload_is_content_addressed(toy, box_and_ids):
    box, ids, _ = box_and_ids
    test = load_dataset("toy:shapes")["test"]
    assert box.upload_images([test.image(0)]) == ids[:1]
    assert box.usage().images == 20
    with pytest.raises(ValueError, match="not a readable"):
        box.upload([b"not an image"])


def test_scores_without_context_are_zero_shot_logits(toy, box_and_ids):
    box, ids, classnames = box_and_ids
    used = box.usage().used
    scores = box.predict(PredictRequest(ids, classnames, "a photo of a {}."))
    assert isinstance(scores, np.ndarray) and scores.shape == (1, 20, 10) and scores.dtype == np.float32
    assert box.usage().used == used + 1
    test = load_dataset("toy:shapes")["test"]
    images = torch.stack([toy.preprocess(test.image(i)) for i in range(0, 500, 25)])
    expected = toy.logit_scale * toy.encode_images(images) @ class_text_weights(toy, classnames, ["a photo of a {}."]).T
    np.testing.assert_allclose(scores[0], expected.detach().numpy(), atol=1e-3)


def test_add_and_replace_contexts(toy, box_and_ids):
    box, ids, classnames = box_and_ids
    plain = box.predict(PredictRequest(ids, classnames))[0]
    zeros = np.zeros((2, 4, toy.token_width), dtype=np.float32)
    added = box.predict(PredictRequest(ids, classnames, contexts=zeros))
    assert added.shape == (2, 20, 10)
    np.testing.assert_allclose(added[0], plain, atol=1e-4)
    words = toy.embed_tokens(toy.tokenize(["a photo of a"]))[0, 1:5].detach().numpy()[None]  # p0, (1, 4, W)
    replaced = box.predict(PredictRequest(ids, classnames, contexts=words, mode="replace"))
    np.testing.assert_allclose(replaced[0], plain, atol=1e-4)
    offset = np.random.default_rng(0).normal(0, 0.5, zeros.shape).astype(np.float32)  # a constant would be LN-invariant
    moved = box.predict(PredictRequest(ids, classnames, contexts=offset))
    assert np.abs(moved[0] - plain).max() > 1e-2


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"contexts": np.full((1, 4, 128), np.nan, dtype=np.float32)}, ValueError),
        ({"contexts": np.zeros((1, 4, 7), dtype=np.float32)}, ValueError),
        ({"contexts": np.zeros((4, 128), dtype=np.float32)}, ValueError),
        ({"contexts": np.zeros((1, 5, 128), dtype=np.float32)}, ValueError),  # template has 4 context words
        ({"template": "no placeholder"}, ValueError),
        ({"classnames": []}, ValueError),
        ({"mode": "multiply"}, ValueError),
        ({"image_ids": ["nope"]}, LookupError),
    ],
)
def test_malformed_requests_are_rejected_without_charge(box_and_ids, kwargs, error):
    box, ids, classnames = box_and_ids
    used, forwards = box.usage().used, box.forwards
    request = {"image_ids": ids, "classnames": classnames, **kwargs}
    with pytest.raises(error):
        box.predict(PredictRequest(**request))
    assert box.usage().used == used and box.forwards == forwards
    assert box.predict(PredictRequest(ids, classnames)).shape == (1, 20, 10)  # still serving


def test_over_budget_costs_no_model_work(toy):
    box = LocalBlackBox(toy, QueryBudget(3))
    ids = box.upload_images([load_dataset("toy:shapes")["test"].image(0)])
    ctx = np.zeros((2, 4, toy.token_width), dtype=np.float32)
    box.predict(PredictRequest(ids, ["circle", "square"], contexts=ctx))
    forwards = box.forwards
    with pytest.raises(BudgetExceeded):
        box.predict(PredictRequest(ids, ["circle", "square"], contexts=ctx))
    assert box.forwards == forwards and box.usage().used == 2
    box.predict(PredictRequest(ids, ["circle", "square"]))  # the last query still fits
    assert box.usage().used == 3


def test_fair_turns_go_round_robin_over_the_keys_that_wait():
    import threading
    import time

    from vlmtune.blackbox.turns import FairTurns

    turns, order = FairTurns(), []
    turns.acquire("a")  # a holds the model; b sends two requests, then c one

    def request(key: str) -> None:
        with turns.turn(key):
            order.append(key)

    threads = []
    for key in ("b", "b", "c"):
        threads.append(threading.Thread(target=request, args=(key,)))
        threads[-1].start()
        time.sleep(0.05)  # arrival order
    for _ in range(3):  # a's long request: three slices, handing over between each
        turns.between("a")
        order.append("a")
    turns.release()
    for t in threads:
        t.join(5)
    assert order == ["b", "c", "a", "b", "a", "a"]  # one slice per key and round: a queues behind b and c
    assert turns.handovers == 5
