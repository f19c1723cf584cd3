"""The HTTP black box: keys, hard budgets under concurrent clients, validation, request splitting, and parity with
LocalBlackBox (the hostile-client suite is in test_service_security.py)."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import key_box, running_server
from vlmtune.blackbox.api import BudgetExceeded, PredictRequest, QueryBudget, ServiceLimits, image_bytes
from vlmtune.blackbox.client import HttpBlackBox
from vlmtune.blackbox.local import LocalBlackBox
from vlmtune.blackbox.server import create_app
from vlmtune.blackbox.wire import encode_array
from vlmtune.data import few_shot, load_dataset
from vlmtune.methods.api import Task
from vlmtune.methods.registry import get_method, make_config
from vlmtune.runs.runner import upload_split

KEYS = {"shared-key-0123456789": 120, "big-key-0123456789ab": None, "tiny-key-0123456789a": 1}
SHARED, BIG, TINY = KEYS


@pytest.fixture(scope="module")
def service(toy):
    budgets = {k: QueryBudget(v) for k, v in KEYS.items()}
    box = LocalBlackBox(toy, visual_prompts=True)
    app = create_app(box, budgets, max_body_bytes=2**20, max_in_flight=8)  # 8 clients share a key below
    with running_server(app) as url:
        yield url, app, budgets


def _images(n=8):
    test = load_dataset("toy:shapes")["test"]
    return [image_bytes(test.image(i)) for i in range(0, 50 * n, 50)], test.classnames


def test_keys_are_required(service):
    url, _, _ = service
    assert httpx.get(f"{url}/v1/info").status_code == 401
    assert httpx.get(f"{url}/v1/info", headers={"X-API-Key": "wrong"}).status_code == 401
    assert httpx.get(f"{url}/v1/info", headers={"Authorization": BIG}).status_code == 401  # no "Bearer"
    info = httpx.get(f"{url}/v1/info", headers={"Authorization": f"Bearer {BIG}"}).json()
    assert info["token_width"] == 128 and info["score"] == "logits" and info["max_body_bytes"] == 2**20
    assert httpx.get(f"{url}/openapi.json").status_code == 200


def test_http_and_local_give_the_same_scores(service, toy):
    url, _, _ = service
    client = HttpBlackBox(url, BIG)
    data, classnames = _images()
    ids = client.upload(data)
    local = LocalBlackBox(toy)
    assert local.upload(data) == ids
    ctx = np.random.default_rng(0).normal(0, 0.3, (3, 4, 128)).astype(np.float32)
    request = PredictRequest(ids, classnames, contexts=ctx)
    np.testing.assert_allclose(client.predict(request), local.predict(request), atol=1e-5)


def test_a_method_gives_the_same_result_through_either_box(service, toy):
    url, _, _ = service
    split = few_shot(load_dataset("toy:nonce-shapes")["train"], 2, seed=1)
    cls = get_method("craft")
    results = []
    for box in (LocalBlackBox(toy), HttpBlackBox(url, BIG)):
        task = Task(split.classnames, split.templates, train=upload_split(box, split, False))
        clf = cls(make_config(cls, {"budget": 44, "popsize": 10, "subspace": 16})).fit(
            box, task, generator=torch.Generator().manual_seed(5)
        )
        results.append(clf.predict_blackbox(box, task.train))
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=1e-4)


def test_craft_on_200_classes_splits_requests_and_equals_the_local_box(toy):
    """10 candidates x 200 images x 200 classes do not fit one reply of this service: the client splits by
    candidates (each still one query), and the result equals the in-process box's."""
    limits = ServiceLimits(max_reply_values=100_000)  # 2 candidates per request
    app = create_app(LocalBlackBox(toy, limits=limits), {BIG: QueryBudget(None)})
    words = ["red", "blue", "green", "yellow", "small", "large", "striped", "dotted"]
    classnames = [f"{a} {b} {c}" for a in words for b in words for c in ("circle", "square", "star", "ring")][:200]
    split = load_dataset("toy:colour-shapes")["test"].subset(range(200))
    labels = torch.arange(200)
    results, queries = [], []
    with running_server(app) as url:
        for box in (LocalBlackBox(toy), HttpBlackBox(url, BIG)):
            refs = upload_split(box, split, False)
            task = Task(classnames, ["a photo of a {}."], train=type(refs)(refs.ids, labels))
            cls = get_method("craft")
            clf = cls(make_config(cls, {"budget": 22, "popsize": 10, "subspace": 16})).fit(
                box, task, generator=torch.Generator().manual_seed(3)
            )
            results.append(clf.predict_blackbox(box, task.train))
            queries.append(box.usage().used)
        client_requests = box.requests
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=1e-4)
    assert queries == [23, 23]  # 2 generations x (10 + 1) + the final prediction: splitting charges nothing extra
    assert client_requests >= 2 * 6  # each generation: 5 requests of 2 candidates + the mean prompt


def test_real_jpegs_upload_in_requests_that_fit_the_body_limit(toy, shared_data):
    root = shared_data / "caltech101" / "101_ObjectCategories"
    files = [f for f in sorted(root.glob("*/*.jpg")) if f.stat().st_size < 600_000][:300]
    data = [f.read_bytes() for f in files]
    app = create_app(LocalBlackBox(toy), {BIG: QueryBudget(None)}, max_body_bytes=2**20)
    with running_server(app) as url:
        client = HttpBlackBox(url, BIG)
        ids = client.upload(data)
        assert client.requests >= 1 + sum(len(d) for d in data) * 4 // 3 // 2**20  # split by bytes
        assert ids == LocalBlackBox(toy).upload(data)
        assert client.usage().images == len(set(ids))


def test_concurrent_clients_never_exceed_a_shared_budget(service):
    url, app, budgets = service
    data, classnames = _images(4)
    ids = HttpBlackBox(url, SHARED).upload(data)
    ctx = np.zeros((3, 4, 128), dtype=np.float32)
    box = key_box(app, SHARED)

    def client_loop(_: int) -> tuple[int, int]:
        client, ok, refused = HttpBlackBox(url, SHARED), 0, 0
        for _ in range(10):
            try:
                client.predict(PredictRequest(ids, classnames, contexts=ctx))
                ok += 1
            except BudgetExceeded:
                refused += 1
        return ok, refused

    forwards = box.forwards
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(client_loop, range(8)))
    ok = sum(o for o, _ in outcomes)
    assert budgets[SHARED].used == 3 * ok <= 120 and ok == 40
    assert sum(r for _, r in outcomes) == 80 - 40
    assert box.forwards - forwards == ok  # refused requests did no model work
    assert HttpBlackBox(url, SHARED).usage().used == 120


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(service):
    url, _, _ = service
    headers = {"X-API-Key": BIG}
    data, classnames = _images(2)
    ids = HttpBlackBox(url, BIG).upload(data)

    def post(body, path="/v1/predict"):
        return httpx.post(f"{url}{path}", json=body, headers=headers).status_code

    good = {"image_ids": ids, "classnames": classnames}
    nan = np.full((1, 4, 128), np.nan, dtype=np.float32)
    assert post({**good, "contexts": encode_array(nan)}) == 400
    assert post({**good, "contexts": encode_array(np.zeros((1, 4, 5), dtype=np.float32))}) == 400
    assert post({**good, "contexts": {"dtype": "float32", "shape": [1, 4, 128], "data": "AAAA"}}) == 400
    assert post({**good, "contexts": {"dtype": "float64", "shape": [1], "data": "AAAAAAAAAAA="}}) == 422
    assert post({**good, "image_ids": ["unknown"]}) == 404
    assert post({**good, "classnames": []}) == 422
    assert post({**good, "template": "no slot"}) == 400
    assert post({"images": ["@@not-base64"]}, "/v1/images") == 400
    assert post({"images": [base64.b64encode(b"junk").decode()]}, "/v1/images") == 400
    big = {"images": [base64.b64encode(b"x" * (2**20)).decode()]}
    assert post(big, "/v1/images") == 413
    r = httpx.post(f"{url}/v1/predict", content=b"{not json", headers={**headers, "content-type": "application/json"})
    assert r.status_code == 422
    assert post(good) == 200  # still serving


def test_over_budget_is_429(service):
    url, _, _ = service
    client = HttpBlackBox(url, TINY)
    data, classnames = _images(1)
    ids = client.upload(data)
    client.predict(PredictRequest(ids, classnames))
    with pytest.raises(BudgetExceeded):
        client.predict(PredictRequest(ids, classnames))
    r = httpx.post(f"{url}/v1/predict", json={"image_ids": ids, "classnames": classnames}, headers={"X-API-Key": TINY})
    assert r.status_code == 429 and r.json()["limit"] == 1


def test_cli_predict_with_a_black_box_adapter_against_the_service(service, tmp_path, capsys):
    from vlmtune.cli import main
    from vlmtune.runs.runner import RunConfig, run

    url, _, budgets = service
    cfg = RunConfig(method="bbt", dataset="toy:shapes-sketch", shots=2, options={"budget": 40, "popsize": 10})
    run(cfg, out_dir=tmp_path / "run", progress=False)
    test = load_dataset("toy:shapes-sketch")["test"]
    for i in (0, 400):
        test.image(i).save(tmp_path / f"{i}.png")
    used = budgets[BIG].used
    images = [str(tmp_path / "0.png"), str(tmp_path / "400.png")]
    args = ["-q", "predict", "--run", str(tmp_path / "run"), *images, "--out", "-", "--service", url]
    assert main([*args, "--api-key", BIG]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == 2 and all(r.split(",")[1] in test.classnames for r in rows)
    assert budgets[BIG].used == used + 1  # one query for the batch


def test_fit_trains_through_a_service_and_a_hard_limit_ends_it_cleanly(toy, tmp_path, capsys, monkeypatch):
    """`vlmtune fit --service`: the run plans within the key's limit, ends with the adapter so far and says so;
    the API key never reaches the run directory."""
    from vlmtune.cli import main

    key = "fit-key-0123456789abcdef"
    budget = QueryBudget(100)
    app = create_app(LocalBlackBox(toy), {key: budget})
    with running_server(app) as url:
        monkeypatch.setenv("VLMTUNE_API_KEY", key)
        out = tmp_path / "run"
        args = ["-q", "fit", "--method", "craft", "--dataset", "toy:shapes-sketch", "--shots", "2", "--out", str(out)]
        opts = ["--set", "budget=400", "--set", "popsize=10", "--set", "subspace=16"]
        assert main([*args, *opts, "--service", url]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["queries"] <= 100 and budget.used <= 100
    assert any("allows" in n for n in results["notes"]) and "allows" in capsys.readouterr().out
    assert key not in "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())


def test_visual_prompts_over_http(service, toy):
    url, _, _ = service
    client = HttpBlackBox(url, BIG)
    assert client.info().visual_width == 128 and client.info().max_visual > 0
    data, classnames = _images(3)
    ids = client.upload(data)
    rng = np.random.default_rng(1)
    ctx = rng.normal(0, 0.3, (2, 4, 128)).astype(np.float32)
    vis = rng.normal(0, 1.0, (2, 5, 128)).astype(np.float32)
    request = PredictRequest(ids, classnames, contexts=ctx, visual_contexts=vis)
    local = LocalBlackBox(toy, visual_prompts=True)
    local.upload(data)
    np.testing.assert_allclose(client.predict(request), local.predict(request), atol=1e-4)
    headers = {"X-API-Key": BIG}
    good = {"image_ids": ids, "classnames": classnames}
    bad = [
        np.zeros((3, 5, 128), np.float32),  # 3 visual candidates for 2 text contexts
        np.zeros((2, 5, 7), np.float32),  # wrong width
        np.full((2, 5, 128), np.inf, np.float32),
    ]
    for v in bad:
        body = {**good, "contexts": encode_array(ctx), "visual_contexts": encode_array(v)}
        assert httpx.post(f"{url}/v1/predict", json=body, headers=headers).status_code == 400
