"""The HTTP black box: keys, hard budgets under concurrent clients, validation, and parity with LocalBlackBox."""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from vlmtune.blackbox.api import BudgetExceeded, PredictRequest, QueryBudget, image_bytes  # noqa: E402
from vlmtune.blackbox.client import HttpBlackBox  # noqa: E402
from vlmtune.blackbox.local import LocalBlackBox  # noqa: E402
from vlmtune.blackbox.server import create_app  # noqa: E402
from vlmtune.blackbox.wire import encode_array  # noqa: E402
from vlmtune.data import few_shot, load_dataset  # noqa: E402
from vlmtune.methods.base import Task, get_method, make_config  # noqa: E402
from vlmtune.runs.runner import upload_split  # noqa: E402

KEYS = {"shared": 120, "big": None, "tiny": 1}


@pytest.fixture(scope="module")
def service(toy):
    budgets = {k: QueryBudget(v) for k, v in KEYS.items()}
    box = LocalBlackBox(toy, visual_prompts=True)
    app = create_app(box, budgets, max_body_bytes=2**20)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", box, budgets
    server.should_exit = True
    thread.join(timeout=10)


def _images(n=8):
    test = load_dataset("toy:shapes")["test"]
    return [image_bytes(test.image(i)) for i in range(0, 50 * n, 50)], test.classnames


def test_keys_are_required(service):
    url, _, _ = service
    assert httpx.get(f"{url}/v1/info").status_code == 401
    assert httpx.get(f"{url}/v1/info", headers={"X-API-Key": "wrong"}).status_code == 401
    info = httpx.get(f"{url}/v1/info", headers={"X-API-Key": "big"}).json()
    assert info["token_width"] == 128 and info["score"] == "logits"
    assert httpx.get(f"{url}/openapi.json").status_code == 200


def test_http_and_local_give_the_same_scores(service, toy):
    url, _, _ = service
    client = HttpBlackBox(url, "big")
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
    for box in (LocalBlackBox(toy), HttpBlackBox(url, "big")):
        task = Task(split.classnames, split.templates, train=upload_split(box, split, False))
        clf = cls(make_config(cls, {"budget": 44, "popsize": 10, "subspace": 16})).fit(
            box, task, generator=torch.Generator().manual_seed(5)
        )
        results.append(clf.predict_blackbox(box, task.train))
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=1e-4)


def test_concurrent_clients_never_exceed_a_shared_budget(service):
    url, box, budgets = service
    data, classnames = _images(4)
    ids = HttpBlackBox(url, "shared").upload(data)
    ctx = np.zeros((3, 4, 128), dtype=np.float32)

    def client_loop(_: int) -> tuple[int, int]:
        client, ok, refused = HttpBlackBox(url, "shared"), 0, 0
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
    assert budgets["shared"].used == 3 * ok <= 120 and ok == 40
    assert sum(r for _, r in outcomes) == 80 - 40
    assert box.forwards - forwards == ok  # refused requests did no model work
    assert HttpBlackBox(url, "shared").usage().used == 120


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(service):
    url, _, _ = service
    headers = {"X-API-Key": "big"}
    data, classnames = _images(2)
    ids = HttpBlackBox(url, "big").upload(data)

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
    client = HttpBlackBox(url, "tiny")
    data, classnames = _images(1)
    ids = client.upload(data)
    client.predict(PredictRequest(ids, classnames))
    with pytest.raises(BudgetExceeded):
        client.predict(PredictRequest(ids, classnames))
    r = httpx.post(
        f"{url}/v1/predict", json={"image_ids": ids, "classnames": classnames}, headers={"X-API-Key": "tiny"}
    )
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
    used = budgets["big"].used
    assert (
        main(
            [
                "-q",
                "predict",
                "--run",
                str(tmp_path / "run"),
                str(tmp_path / "0.png"),
                str(tmp_path / "400.png"),
                "--out",
                "-",
                "--service",
                url,
                "--api-key",
                "big",
            ]
        )
        == 0
    )
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == 2 and all(r.split(",")[1] in test.classnames for r in rows)
    assert budgets["big"].used == used + 1  # one query for the batch


def test_visual_prompts_over_http(service, toy):
    url, _, _ = service
    client = HttpBlackBox(url, "big")
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
    headers = {"X-API-Key": "big"}
    good = {"image_ids": ids, "classnames": classnames}
    bad = [
        np.zeros((3, 5, 128), np.float32),  # 3 visual candidates for 2 text contexts
        np.zeros((2, 5, 7), np.float32),  # wrong width
        np.full((2, 5, 128), np.inf, np.float32),
    ]
    for v in bad:
        body = {**good, "contexts": encode_array(ctx), "visual_contexts": encode_array(v)}
        assert httpx.post(f"{url}/v1/predict", json=body, headers=headers).status_code == 400
