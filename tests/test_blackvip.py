"""BlackVIP: pixel-prompt queries (box, service, hostile client), the coordinator, SPSA-GC, and a run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import key_box, running_server
from vlmtune.blackbox.api import BudgetExceeded, ImageRefs, PredictRequest, QueryBudget, ServiceLimits, image_bytes
from vlmtune.blackbox.local import LocalBlackBox, pixel_affine
from vlmtune.data import load_dataset
from vlmtune.methods.api import Task
from vlmtune.methods.blackbox.blackvip import (
    BlackVIP,
    BlackVIPClassifier,
    Coordinator,
    SPSATrainer,
    new_coordinator,
    segmented_uniform,
    upsamplings_for,
)
from vlmtune.methods.registry import list_methods, load_classifier, make_config

NAMES = ["circle", "square", "triangle"]
KEY, RUN_KEY = "pixel-key-0123456789abcdef", "pixel-run-key-0123456789ab"


def _pngs(n: int) -> list[bytes]:
    test = load_dataset("toy:shapes")["test"]
    return [image_bytes(test.image(i)) for i in range(n)]


def test_pixel_affine_recovers_the_normalisation(toy):
    size, mean, std = pixel_affine(toy)
    assert size == toy.preprocess.size
    torch.testing.assert_close(mean.flatten(), torch.full((3,), toy.preprocess.mean))
    torch.testing.assert_close(std.flatten(), torch.full((3,), toy.preprocess.std))


def test_box_scores_pixel_prompts_and_charges_every_candidate(toy):
    box = LocalBlackBox(toy, QueryBudget(100), pixel_prompts=True)
    ids = box.upload(_pngs(4))
    decoding = box.budget.work_used  # uploads are charged their decoding (ServiceLimits.decode_work)
    s = box.info().image_size
    plain = box.predict(PredictRequest(ids, NAMES))[0]  # (N, K)
    prompts = np.zeros((3, 4, 3, s, s), np.float32)
    prompts[1] = 1.0  # every pixel pushed to white: all images look the same
    prompts[2, :, :, : s // 2] = 0.3
    scores = box.predict(PredictRequest(ids, NAMES, pixel_prompts=prompts))
    assert scores.shape == (3, 4, 3)
    np.testing.assert_allclose(scores[0], plain, atol=1e-4)  # a zero prompt leaves the images as they were
    np.testing.assert_allclose(scores[1], np.broadcast_to(scores[1, :1], (4, 3)), atol=1e-4)
    assert not np.allclose(scores[2], plain, atol=1e-2)
    assert box.budget.used == 1 + 3 and box.budget.work_used - decoding == 4 * 3 + 3 * 4 * 3
    assert box.image_forwards >= 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p[:, :2], "shape"),  # prompts for 2 of 4 images
        (lambda p: p[..., :8], "shape"),  # not the model's input size
        (lambda p: np.where(p == 0, np.nan, p), "finite"),
        (lambda p: p + 1e6, "within"),
    ],
)
def test_malformed_pixel_prompts_are_refused_before_any_charge(toy, change, message):
    box = LocalBlackBox(toy, QueryBudget(100), pixel_prompts=True)
    ids = box.upload(_pngs(4))
    s = box.info().image_size
    with pytest.raises(ValueError, match=message):
        box.predict(PredictRequest(ids, NAMES, pixel_prompts=change(np.zeros((2, 4, 3, s, s), np.float32))))
    assert box.budget.used == 0 and box.image_forwards == 0


def test_pixel_prompt_limits_and_boxes_that_take_none(toy):
    plain = LocalBlackBox(toy)
    ids = plain.upload(_pngs(2))
    with pytest.raises(ValueError, match="takes no pixel prompts"):
        plain.predict(PredictRequest(ids, NAMES, pixel_prompts=np.zeros((1, 2, 3, 32, 32), np.float32)))
    tight = LocalBlackBox(toy, pixel_prompts=True, limits=ServiceLimits(max_pixel_values=3 * 32 * 32 * 3))
    tight.upload(_pngs(2))
    with pytest.raises(ValueError, match="pixel prompt values"):
        tight.predict(PredictRequest(ids, NAMES, pixel_prompts=np.zeros((2, 2, 3, 32, 32), np.float32)))
    assert plain.budget.used == 0 and tight.budget.used == 0


@pytest.fixture(scope="module")
def pixel_service(toy):
    from vlmtune.blackbox.accounts import KeySpec
    from vlmtune.blackbox.server import create_app

    keys = {KEY: KeySpec(queries=200), RUN_KEY: KeySpec(queries=400)}
    app = create_app(LocalBlackBox(toy, pixel_prompts=True), keys, max_body_bytes=64 * 2**10)
    with running_server(app) as url:
        yield url, app


def test_service_splits_pixel_prompts_to_fit_its_body_limit(toy, pixel_service):
    from vlmtune.blackbox.client import HttpBlackBox

    url, app = pixel_service
    remote, local = HttpBlackBox(url, KEY), LocalBlackBox(toy, pixel_prompts=True)
    data = _pngs(8)
    ids = remote.upload(data)
    local.upload(data)
    s = remote.info().image_size
    prompts = np.random.default_rng(0).uniform(-0.2, 0.2, (2, 8, 3, s, s)).astype(np.float32)  # 8 x 16 KB each
    request = PredictRequest(ids, NAMES, pixel_prompts=prompts)
    before = key_box(app, KEY).budget.used
    np.testing.assert_allclose(remote.predict(request), local.predict(request), atol=1e-5)
    parts = key_box(app, KEY).budget.used - before
    assert parts > 2  # 2 candidates, split by images: every request's candidates are charged


def test_blackvip_trains_and_scores_through_the_service(pixel_service):
    from vlmtune.errors import VlmtuneError
    from vlmtune.runs.runner import RunConfig, run

    url, app = pixel_service
    options = {"epochs": 1, "batch_size": 64, "sp_avg": 1, "p_eps": 0.1}
    cfg = RunConfig(method="blackvip", dataset="toy:shapes", options=options, service=url)
    with pytest.raises(VlmtuneError, match="encoder"):  # the client names its own encoder, never the served one
        run(cfg, progress=False, api_key=RUN_KEY)
    cfg = RunConfig(method="blackvip", dataset="toy:shapes", options={**options, "encoder": "toy:small"}, service=url)
    result = run(cfg, progress=False, api_key=RUN_KEY)
    from vlmtune.blackbox.client import HttpBlackBox

    step = HttpBlackBox(url, RUN_KEY).pixel_images_per_request(["circle"] * 10)  # 3 toy images per 64 KB body
    assert result.queries == 2 * 2 * -(-64 // step)  # 2 steps x 2 candidates x the parts of a 64-image batch
    used = key_box(app, RUN_KEY).budget.used
    assert used <= 400 and result.metrics["test"]["acc1"] > 50  # test scored through the service, within the key


def test_coordinator_matches_the_reference_architecture():
    ref = Coordinator(768, 1568, 5)  # MAE ViT-B features, SRC_DIM 1568: the reference's decoder and trigger
    assert sum(p.numel() for p in ref.parameters()) == 9920
    assert ref.trigger.shape == (1, 800)
    assert ref(torch.zeros(2, 768)).shape == (2, 3, 224, 224)
    assert [upsamplings_for(s) for s in (32, 56, 224, 336)] == [3, 3, 5, 5]
    assert Coordinator(64, 1568, 3)(torch.zeros(1, 64)).shape == (1, 3, 56, 56)
    with pytest.raises(ValueError, match="multiple of 49"):
        Coordinator(768, 1000)
    d = segmented_uniform(10_000, torch.Generator().manual_seed(0))
    assert float(d.abs().min()) >= 0.5 and float(d.abs().max()) <= 1.0 and abs(float(d.mean())) < 0.05


class _QuadraticBox:
    """Stands in for the trainer's query: the loss of a parameter vector is |w - target|^2."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target

    def __call__(self, w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (w - self.target).pow(2).sum(-1), None


def test_spsa_gc_step_follows_its_equations(toy):
    cfg = make_config(BlackVIP, {"sp_avg": 2, "spsa_a": 0.01, "spsa_c": 0.01, "moms": 0.9})
    clf = BlackVIPClassifier(NAMES, "{}", new_coordinator(8, 49, 2, torch.Generator().manual_seed(0)), {})
    trainer = object.__new__(SPSATrainer)
    trainer.cfg, trainer.params, trainer.momentum, trainer.clf = cfg, list(clf.coordinator.parameters()), None, clf
    w0 = torch.nn.utils.parameters_to_vector(trainer.params).detach().clone()
    trainer.losses = _QuadraticBox(torch.zeros_like(w0))
    m, w = None, w0.clone()
    for k in (1, 2):
        g_run = torch.Generator().manual_seed(k)
        trainer.step(k, torch.arange(4), g_run)
        g_ref = torch.Generator().manual_seed(k)
        deltas = torch.stack([segmented_uniform(len(w), g_ref) for _ in range(2)])
        a_k, c_k = 0.01 / (k + 1.0) ** 0.4, 0.01 / k**0.1
        loss = lambda v: v.pow(2).sum(-1)  # noqa: E731
        g = ((loss(w + c_k * deltas) - loss(w - c_k * deltas))[:, None] / (2 * c_k * deltas)).mean(0)
        m = g if m is None else 0.9 * m + g
        w = w - a_k * (g + 0.9 * m)
        torch.testing.assert_close(torch.nn.utils.parameters_to_vector(trainer.params), w)
    assert trainer.momentum is not None and not torch.equal(w, w0)


def test_blackvip_run_saves_predicts_and_counts_queries(toy, tmp_path):
    from vlmtune.runs.runner import RunConfig, bind_client_encoder, run, split_logits

    options = {"encoder": "toy:small", "epochs": 3, "batch_size": 64, "sp_avg": 2, "p_eps": 0.1}
    cfg = RunConfig(method="blackvip", dataset="toy:shapes", options=options, query_budget=30)
    result = run(cfg, out_dir=tmp_path / "run", progress=False)
    assert 0 < result.queries <= 30  # the hard limit holds; every candidate of every step was charged
    assert result.metrics["test"]["acc1"] > 50
    loaded, meta = load_classifier(tmp_path / "run" / "adapter")
    assert meta["settings"]["encoder"] == "toy:small" and not loaded.encoder_bound
    test = load_dataset("toy:shapes")["test"]
    logits, _ = split_logits(loaded, toy, test, None, False)  # binds toy:small, prompts through a fresh box
    bind_client_encoder(result.classifier, "cpu")
    torch.testing.assert_close(logits, split_logits(result.classifier, toy, test, None, False)[0])


def test_blackvip_needs_images_an_encoder_and_a_pixel_box(toy):
    box = LocalBlackBox(toy)
    ids = box.upload(_pngs(2))
    method = BlackVIP(make_config(BlackVIP, {"encoder": "toy:small"}))
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="client's own copies"):
        method.fit(box, Task(NAMES, ["{}"], train=ImageRefs(ids, torch.zeros(2))), generator=g)
    refs = ImageRefs(ids, torch.zeros(2, dtype=torch.long), [None, None])
    with pytest.raises(ValueError, match="encoder"):
        method.fit(box, Task(NAMES, ["{}"], train=refs), generator=g)
    with pytest.raises(ValueError, match="takes no pixel prompts"):
        method.fit(box, Task(NAMES, ["{}"], train=refs, encoder=toy), generator=g)
    assert issubclass(BudgetExceeded, RuntimeError)


SECOND_MODEL = [m.name for m in list_methods("black_box") if m().wants_encoder() == ""]  # a second model: the run's


@pytest.mark.parametrize("name", SECOND_MODEL)
def test_a_users_own_backbone_object_is_used_as_the_client_encoder(name, toy, tmp_path):
    """Issue 29 item 10: a method that takes a second model (the client-side encoder) uses the Backbone object the
    run was given when its spec names nothing loadable, instead of re-loading the spec ("unknown family 'byo'")."""
    import copy

    from vlmtune.runs.runner import RunConfig, run

    mine = copy.copy(toy)
    mine.spec = "byo:my-own-clip"  # no loader knows this family
    options = {"epochs": 2, "batch_size": 64, "sp_avg": 2, "p_eps": 0.1} if name == "blackvip" else {}
    result = run(
        RunConfig(method=name, dataset="toy:shapes", options=options, query_budget=20),
        backbone=mine,
        out_dir=tmp_path / name,
        progress=False,
    )
    assert 0 < result.queries <= 20
    _, meta = load_classifier(tmp_path / name / "adapter")
    assert meta["settings"]["encoder"] == "byo:my-own-clip"


def test_a_long_pixel_prompt_request_hands_the_model_to_another_keys_short_query(toy, monkeypatch):
    """Round 3: one key's 64-candidate visual-prompt request held the model for 75 s while another key's
    one-image query waited 74 s. The model is now granted in slices, round-robin over the keys that wait."""
    import threading
    import time

    shared = LocalBlackBox(toy, pixel_prompts=True, image_batch=1)
    long_key, short_key = shared.fork(QueryBudget(10_000)), shared.fork(QueryBudget(100))
    long_ids, short_ids = long_key.upload(_pngs(8)), short_key.upload(_pngs(1))
    encode = toy.encode_images

    def slow_encode(x: torch.Tensor) -> torch.Tensor:  # every image-tower batch takes 5 ms: 128 slices >= 0.64 s
        time.sleep(0.005)
        return encode(x)

    monkeypatch.setattr(toy, "encode_images", slow_encode)
    s = shared.info().image_size
    prompts = np.zeros((16, 8, 3, s, s), np.float32)  # 16 candidates x 8 images, one image per forward
    long_done = threading.Event()
    worker = threading.Thread(
        target=lambda: (long_key.predict(PredictRequest(long_ids, NAMES, pixel_prompts=prompts)), long_done.set())
    )
    worker.start()
    while long_key.image_forwards == 0:  # the long request holds the model
        time.sleep(0.001)
    handovers = getattr(shared._compute, "handovers", 0)
    short_key.predict(PredictRequest(short_ids, NAMES))
    forwards_when_short_done = long_key.image_forwards
    assert not long_done.is_set() and forwards_when_short_done < 16 * 8  # it did not wait for the long one
    worker.join()
    assert long_key.image_forwards == 16 * 8 and getattr(shared._compute, "handovers", 0) > handovers
