"""The service as a security boundary, measured with a hostile client (loopback only, bounded loops).

What the service promises (docs/service.md, "Threat model"): a request is validated in full before it is charged,
its work and reply are bounded, a failed request costs nothing, uploads are restricted to small PNG/JPEG/WebP
files within a per-key quota, budgets survive restarts, keys cannot see each other's uploads, and errors never
echo the input or internals.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import socket
import stat
import time

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import key_box, running_server
from vlmtune.blackbox.accounts import KeySpec, UsageStore, generate_keys, load_keys
from vlmtune.blackbox.api import PredictRequest, QueryBudget, ServiceLimits, image_bytes
from vlmtune.blackbox.client import HttpBlackBox
from vlmtune.blackbox.local import LocalBlackBox
from vlmtune.blackbox.server import create_app, server_config
from vlmtune.data import load_dataset
from vlmtune.errors import VlmtuneError

A, B = "alice-key-0123456789abcdef", "bob-key-0123456789abcdefgh"
C = "carol-key-0123456789abcdef"  # the pixel-prompt tests' own key (the others count A's and B's usage)
ADDRESS = re.compile(r"0x[0-9a-f]{6,}")


@pytest.fixture(scope="module")
def hostile(toy, tmp_path_factory):
    store = UsageStore(tmp_path_factory.mktemp("state") / "usage.sqlite")
    keys = {A: KeySpec(queries=1, images=30), B: KeySpec(queries=1000), C: KeySpec(queries=100)}
    box = LocalBlackBox(toy, pixel_prompts=True)  # BlackVIP's pixel-prompt queries are part of the surface
    app = create_app(box, keys, store, max_body_bytes=8 * 2**20, body_timeout=1.0)
    with running_server(app, header_timeout=1.0, max_connections=64) as url:
        yield url, app, store


def _png(i: int = 0) -> bytes:
    return image_bytes(load_dataset("toy:shapes")["test"].image(i))


def _post(url: str, path: str, body: dict, key: str = A) -> httpx.Response:
    return httpx.post(f"{url}/v1{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _ids(url: str, key: str, n: int = 2) -> list[str]:
    return HttpBlackBox(url, key).upload([_png(i) for i in range(n)])


def test_unbounded_work_is_refused_before_any_charge(hostile):
    url, app, _ = hostile
    ids = _ids(url, A)
    box = key_box(app, A)
    start = time.perf_counter()
    many = _post(url, "/predict", {"image_ids": ids * 50_000, "classnames": [f"c{i}" for i in range(2000)]})
    wide = _post(url, "/predict", {"image_ids": ids, "classnames": [f"class {i}" for i in range(10_000)]})
    assert many.status_code == 400 and wide.status_code == 400
    assert time.perf_counter() - start < 5  # refused on counts, not after the work
    assert box.budget.used == 0 and box.forwards == 0
    assert _post(url, "/predict", {"image_ids": ids, "classnames": ["circle", "square"]}).status_code == 200
    assert box.budget.used == 1


def _array(shape: tuple[int, ...], nbytes: int | None = None) -> dict:
    raw = np.zeros(int(np.prod(shape)), np.float32).tobytes()[:nbytes]
    return {"dtype": "float32", "shape": list(shape), "data": base64.b64encode(raw).decode()}


def test_hostile_pixel_prompts_are_refused_uncharged(hostile):
    url, app, _ = hostile
    ids = _ids(url, C, 1)
    box = key_box(app, C)
    used, forwards = box.budget.used, box.image_forwards
    s = box.info().image_size
    bodies = [
        {"pixel_prompts": _array((1, 1, 3, s, s, 1))},  # six dimensions
        {"pixel_prompts": _array((1, 1, 3, s // 2, s // 2))},  # not the model's input size
        {"pixel_prompts": _array((1, 1, 3, s, s), nbytes=100)},  # data shorter than its shape says
        {"pixel_prompts": _array((1, 1, 3, s, s)), "visual_contexts": _array((1, 1, 128))},  # both kinds
        {"pixel_prompts": _array((1, 2, 3, s, s))},  # prompts for 2 images, 1 id
    ]
    for extra in bodies:
        r = _post(url, "/predict", {"image_ids": ids, "classnames": ["circle", "square"], **extra}, key=C)
        assert r.status_code in (400, 422), r.text
    n = 8 * 2**20 // (3 * s * s * 4) + 1  # base64 of float32 prompts beyond the 8 MiB body limit
    big = {"image_ids": ids * n, "classnames": ["circle"], "pixel_prompts": _array((1, n, 3, s, s))}
    assert _post(url, "/predict", big, key=C).status_code == 413
    assert box.budget.used == used and box.image_forwards == forwards
    ok = _post(
        url, "/predict", {"image_ids": ids, "classnames": ["circle"], "pixel_prompts": _array((2, 1, 3, s, s))}, key=C
    )
    assert ok.status_code == 200 and box.budget.used == used + 2  # one query per candidate


def test_failed_requests_cost_nothing(toy):
    loose = ServiceLimits(max_context_abs=1e39)
    box = LocalBlackBox(toy, QueryBudget(10), limits=loose)
    ids = box.upload([_png()])
    decoding = box.budget.work_used  # the upload's decoding (ServiceLimits.decode_work)
    huge = np.full((2, 4, toy.token_width), 3e38, dtype=np.float32)  # finite, but it overflows the text tower
    with pytest.raises(ValueError, match="non-finite"):
        box.predict(PredictRequest(ids, ["circle", "square"], contexts=huge))
    assert box.budget.used == 0 and box.budget.work_used == decoding
    strict = LocalBlackBox(toy, QueryBudget(10))
    strict.upload([_png()])
    with pytest.raises(ValueError, match="within"):
        strict.predict(PredictRequest(ids, ["circle", "square"], contexts=huge))
    assert strict.budget.used == 0


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "BMP"])
def test_only_png_jpeg_webp_are_decoded(hostile, fmt):
    url, _, _ = hostile
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format=fmt)
    r = _post(url, "/images", {"images": [base64.b64encode(buf.getvalue()).decode()]}, B)
    assert r.status_code == 400 and "PNG" in r.json()["detail"]
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert _post(url, "/images", {"images": [base64.b64encode(eps).decode()]}, B).status_code == 400


def test_a_decompression_bomb_is_refused_from_its_header(hostile):
    url, _, _ = hostile
    buf = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(buf, format="PNG", optimize=True)  # ~150 KB file, 144 megapixels
    start = time.perf_counter()
    r = _post(url, "/images", {"images": [base64.b64encode(buf.getvalue()).decode()]}, B)
    assert r.status_code == 400 and "pixels" in r.json()["detail"]
    assert time.perf_counter() - start < 1.0  # never decoded


def test_per_key_image_quota_and_uploads_are_counted(hostile):
    url, _, _ = hostile
    client = HttpBlackBox(url, A)
    before = client.usage()
    r = _post(url, "/images", {"images": [base64.b64encode(_png(i)).decode() for i in range(40)]})
    assert r.status_code == 429 and r.json()["what"] == "image"  # quota 30: nothing of the request was kept
    after = client.usage()
    assert after.images == before.images and after.image_quota == 30
    ids = client.upload([_png(i) for i in range(10)])
    assert client.usage().uploaded >= len(set(ids)) > 0


def test_keys_cannot_see_each_others_uploads(hostile):
    url, app, _ = hostile
    secret = image_bytes(Image.new("RGB", (24, 24), (1, 2, 3)))
    ids = HttpBlackBox(url, A).upload([secret])
    r = _post(url, "/predict", {"image_ids": ids, "classnames": ["circle", "square"]}, B)
    assert r.status_code == 404 and ids[0] not in r.text  # no listing of ids, free of charge
    assert key_box(app, B).budget.used == 0 and HttpBlackBox(url, B).usage().images == 0
    # the same file uploaded with another key is new to that key and encoded again: no timing tells it apart
    uploaded = HttpBlackBox(url, B).usage().uploaded
    assert HttpBlackBox(url, B).upload([secret]) == ids and HttpBlackBox(url, B).usage().uploaded == uploaded + 1


def test_budgets_survive_a_restart(toy, tmp_path):
    db = tmp_path / "usage.sqlite"
    key = "restart-key-0123456789ab"
    for expected in (1, 2):
        app = create_app(LocalBlackBox(toy), {key: KeySpec(queries=2)}, UsageStore(db))
        with running_server(app) as url:
            client = HttpBlackBox(url, key)
            ids = client.upload([_png()])
            client.predict(PredictRequest(ids, ["circle", "square"]))
            assert client.usage().used == expected
    app = create_app(LocalBlackBox(toy), {key: KeySpec(queries=2)}, UsageStore(db))
    with running_server(app) as url:
        client = HttpBlackBox(url, key)
        ids = client.upload([_png()])
        r = _post(url, "/predict", {"image_ids": ids, "classnames": ["circle"]}, key)
        assert r.status_code == 429 and client.usage().used == 2  # the third restart did not reset the key
    store = UsageStore(db)
    assert key not in db.read_bytes().decode(errors="ignore") and store.row(store.account(key, KeySpec()).kid)[0] == 2


def test_auth_needs_the_bearer_scheme_or_the_key_header(hostile):
    url, _, _ = hostile
    for headers in ({"Authorization": A}, {"Authorization": f"Basic {A}"}, {"Authorization": "Bearer"}, {}):
        assert httpx.get(f"{url}/v1/usage", headers=headers).status_code == 401
    assert httpx.get(f"{url}/v1/usage", headers={"X-API-Key": A}).status_code == 200


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"k-0123456789abcdef": 1.9}, "whole number"),
        ({"k-0123456789abcdef": True}, "whole number"),
        ({"k-0123456789abcdef": -1}, "whole number"),
        ({"": 5}, "empty"),
        ({"with space 0123456789": 5}, "whitespace"),
        ({"k-0123456789abcdef": {"queries": 5, "typo": 1}}, "typo"),
        ([1, 2], "JSON object"),
    ],
)
def test_keys_file_mistakes_are_one_line(tmp_path, content, message):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(content))
    with pytest.raises(VlmtuneError, match=message) as exc:
        load_keys(path)
    assert "\n" not in str(exc.value) and "0123456789" not in str(exc.value)
    path.write_text("{not json")
    with pytest.raises(VlmtuneError, match="not valid JSON"):
        load_keys(path)


def test_weak_keys_and_readable_files_warn_and_generated_keys_stay_secret(tmp_path, caplog):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"short": 5}))
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING):
        load_keys(path)
    assert "characters" in caplog.text and "chmod 600" in caplog.text and "short" not in caplog.text
    caplog.clear()
    generated = tmp_path / "state" / "keys.json"
    with caplog.at_level(logging.DEBUG):
        keys = generate_keys(generated, 100)
    (key,) = keys
    assert stat.S_IMODE(generated.stat().st_mode) == 0o600 and key not in caplog.text
    assert generate_keys(generated, 5) == keys  # reused, so its persisted usage stays attached


def test_binding_all_interfaces_warns(caplog, toy):
    app = create_app(LocalBlackBox(toy), {A: QueryBudget(1)})
    with caplog.at_level(logging.WARNING):
        server_config(app, "0.0.0.0", 0)
    assert "reachable from the network" in caplog.text


@pytest.mark.parametrize("template", ["{}{!r}", "{0}", "{name}", "{:>10}", "{", "}{}", "a {} and {}"])
def test_bad_templates_are_400_not_500(hostile, template):
    url, _, _ = hostile
    ids = _ids(url, B, 1)
    r = _post(url, "/predict", {"image_ids": ids, "classnames": ["circle"], "template": template}, B)
    assert r.status_code == 400, r.text


def test_internal_errors_are_500_without_details(hostile, monkeypatch):
    url, app, _ = hostile
    ids = _ids(url, B, 1)
    box = key_box(app, B)

    def broken(*_args, **_kwargs):
        raise KeyError("secret internal state at 0x7f3a2b1c0d")

    monkeypatch.setattr(box, "_prompt_embeddings", broken)
    r = _post(url, "/predict", {"image_ids": ids, "classnames": ["circle"]}, B)
    assert r.status_code == 500 and r.json() == {"detail": "internal error"}


def test_error_bodies_never_echo_input_or_addresses(hostile):
    url, _, _ = hostile
    marker = "MARKER-" + "x" * 50
    bodies = [
        {"image_ids": [marker], "classnames": 5},
        {"image_ids": [marker], "classnames": ["a"], "contexts": {"dtype": "float32", "shape": [1], "data": marker}},
        {"images": [marker]},
    ]
    for path, body in (("/predict", bodies[0]), ("/predict", bodies[1]), ("/images", bodies[2])):
        r = _post(url, path, body, B)
        assert 400 <= r.status_code < 500 and marker not in r.text and not ADDRESS.search(r.text), r.text
    junk = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()
    r = _post(url, "/images", {"images": [junk]}, B)
    assert r.status_code == 400 and not ADDRESS.search(r.text) and "BytesIO" not in r.text


def test_half_sent_requests_are_dropped(hostile):
    url, _, _ = hostile
    host, port = url.removeprefix("http://").split(":")
    heads = []
    for _ in range(40):  # request heads that never end
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
        heads.append(s)
    body = socket.create_connection((host, int(port)), timeout=5)  # a body that never ends
    body.sendall(
        f"POST /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {B}\r\nContent-Type: application/json\r\n"
        'Content-Length: 5000\r\n\r\n{"images": ['.encode()
    )
    assert httpx.get(f"{url}/v1/usage", headers={"X-API-Key": B}).status_code == 200  # still serving meanwhile
    time.sleep(2.5)
    closed = 0
    for s in heads:
        try:
            closed += s.recv(100) == b""
        except OSError:
            closed += 1
        s.close()
    assert closed == len(heads)
    reply = body.recv(1000)
    body.close()
    assert b" 408 " in reply.split(b"\r\n")[0]


def test_docs_work_offline(hostile):
    url, _, _ = hostile
    r = httpx.get(f"{url}/docs")
    assert r.status_code == 200 and "/v1/predict" in r.text
    assert "<script" not in r.text and "cdn" not in r.text.lower()


# ---- issue 29: uploads bounded before decoding, keep-alive heads timed, connections per address ------------------
def _big_png(side: int, shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side), shade).save(buf, format="PNG", optimize=True)  # a few KB, side^2 pixels
    return buf.getvalue()


@pytest.fixture
def decodes(monkeypatch):
    """Counts images decoded by the box, and the most full-size images alive at once."""
    import weakref

    from vlmtune.blackbox import local

    seen = {"decoded": 0, "alive": 0, "peak": 0}
    original = local.decode_opened

    def counted(im, limits):
        rgb = original(im, limits)
        seen["decoded"] += 1
        seen["alive"] += 1
        seen["peak"] = max(seen["peak"], seen["alive"])
        weakref.finalize(rgb, lambda: seen.__setitem__("alive", seen["alive"] - 1))
        return rgb

    monkeypatch.setattr(local, "decode_opened", counted)
    return seen


def test_an_upload_over_quota_or_pixel_budget_decodes_nothing(toy, decodes):
    bombs = [_big_png(1024, i) for i in range(20)]  # 20 megapixels in ~60 KB
    full = LocalBlackBox(toy).fork(QueryBudget(10), image_quota=0)
    with pytest.raises(Exception, match="image"):
        full.upload(bombs)  # a key at its quota: refused from the count alone
    box = LocalBlackBox(toy, limits=ServiceLimits(max_upload_pixels=4 * 1024 * 1024))
    with pytest.raises(ValueError, match="pixels in one upload"):
        box.upload(bombs)
    assert decodes["decoded"] == 0 and box.usage().images == 0


def test_decoding_is_charged_as_work_and_done_one_image_at_a_time(toy, decodes):
    limits = ServiceLimits()
    poor = LocalBlackBox(toy, limits=limits).fork(QueryBudget(10, work_limit=limits.decode_work(256 * 256) - 1))
    with pytest.raises(Exception, match="work"):
        poor.upload([_big_png(256, 1)])
    assert decodes["decoded"] == 0 and poor.usage().work == 0
    box = LocalBlackBox(toy, image_batch=4).fork(QueryBudget(10, work_limit=10**6))
    ids = box.upload([_big_png(256, i) for i in range(6)])
    assert len(set(ids)) == 6 and decodes["decoded"] == 6 and decodes["peak"] == 1
    assert box.usage().work == 6 * limits.decode_work(256 * 256)


def test_the_client_splits_uploads_by_the_pixel_budget(toy):
    box = LocalBlackBox(toy, limits=ServiceLimits(max_upload_pixels=2 * 64 * 64))
    app = create_app(box, {B: KeySpec(queries=10)})
    with running_server(app) as url:
        ids = HttpBlackBox(url, B).upload([_big_png(64, i) for i in range(5)])
        assert len(set(ids)) == 5 and key_box(app, B).usage().images == 5


def test_a_trickled_head_on_a_kept_alive_connection_is_dropped(hostile):
    url, _, _ = hostile  # header_timeout 1 s
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=5)
    s.sendall(f"GET /v1/usage HTTP/1.1\r\nHost: x\r\nX-API-Key: {B}\r\n\r\n".encode())
    assert b" 200 " in s.recv(4096).split(b"\r\n")[0]
    start, closed = time.monotonic(), False
    s.settimeout(0.25)
    for byte in b"GET /v1/usage HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n":  # 4/s, never ends
        try:
            s.sendall(bytes([byte]))
            closed = s.recv(100) == b""
        except TimeoutError:
            continue
        except OSError:
            closed = True
        if closed:
            break
    s.close()
    assert closed and time.monotonic() - start < 5


def test_connections_beyond_the_per_address_limit_are_closed(toy):
    app = create_app(LocalBlackBox(toy), {B: KeySpec(queries=10)})
    with running_server(app, max_per_address=3) as url:
        host, port = url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(5)]
        time.sleep(0.3)
        closed = 0
        for s in held:
            s.settimeout(0.3)
            try:
                closed += s.recv(10) == b""
            except TimeoutError:
                pass
            except OSError:
                closed += 1
        assert closed == 2
        for s in held:
            s.close()
        time.sleep(0.3)  # the slots are given back
        assert httpx.get(f"{url}/v1/usage", headers={"X-API-Key": B}).status_code == 200


def test_the_usage_database_is_private(tmp_path):
    db = tmp_path / "usage.sqlite"
    store = UsageStore(db)
    store.account(B, KeySpec(queries=5)).charge(1)
    for f in tmp_path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name
    store.close()


def _chat(text: str = "a {} shape.", image: bytes | None = None, **extra) -> dict:
    content: list = [{"type": "text", "text": text}]
    if image is not None:
        content.append(
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}}
        )
    return {"model": "toy", "messages": [{"role": "user", "content": content}], **extra}


def test_textgen_serve_is_hardened_like_serve(tmp_path, monkeypatch):
    from starlette.testclient import TestClient

    from vlmtune.textgen import serve
    from vlmtune.textgen.backends.toy import ToyBackend

    toy_gen = ToyBackend()

    decoded = []
    original = serve.decode_upload
    monkeypatch.setattr(serve, "decode_upload", lambda data, limits: decoded.append(1) or original(data, limits))
    store = UsageStore(tmp_path / "usage.sqlite")
    app = serve.chat_app(toy_gen, {A: KeySpec(queries=2)}, store=store, max_body_bytes=64 * 1024)
    with TestClient(app) as client:
        post = client.post
        assert post("/v1/chat/completions", json=_chat()).status_code == 401
        key = {"Authorization": f"Bearer {A}"}
        assert post("/v1/chat/completions", json=_chat(), headers=key).status_code == 200
        png = _png()
        r = post("/v1/chat/completions", json=_chat(image=png) | {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
        ] * 3}]}, headers=key)  # fmt: skip
        assert r.status_code == 400 and "one image" in r.text and not decoded  # counted before any decoding
        assert post("/v1/chat/completions", json=_chat("x" * 40_000), headers=key).status_code == 400
        assert post("/v1/chat/completions", json=_chat("y" * 70_000), headers=key).status_code == 413
        bad = {"model": "toy", "messages": [{"role": "user", "content": ["not a part"]}]}
        assert post("/v1/chat/completions", json=bad, headers=key).status_code == 400
        assert post("/v1/chat/completions", json=_chat(seed=2**80), headers=key).status_code == 422
        docs = client.get("/docs")
        assert docs.status_code == 200 and "/v1/chat/completions" in docs.text and "<script" not in docs.text
        echo = post("/v1/chat/completions", json={"model": "toy", "messages": ["MARKER-echo"]}, headers=key)
        assert echo.status_code == 422 and "MARKER" not in echo.text and "messages" in echo.json()["error"]["message"]
        assert post("/v1/chat/completions", json=_chat(), headers=key).status_code == 200
        assert post("/v1/chat/completions", json=_chat(), headers=key).status_code == 429  # 2 completions
    store.close()
    again = serve.chat_app(toy_gen, {A: KeySpec(queries=2)}, store=UsageStore(tmp_path / "usage.sqlite"))
    with TestClient(again) as client:  # the budget survives a restart
        assert client.post("/v1/chat/completions", json=_chat(), headers=key).status_code == 429


def test_ctrl_c_stops_the_service_with_one_line(tmp_path):
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vlmtune", "serve", "--port", str(port), "--state", str(tmp_path / "state")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and time.monotonic() - start < 5
    assert out.strip().splitlines()[-1].startswith("vlmtune serve: stopped") and "Traceback" not in err


def test_a_reply_the_client_never_reads_is_dropped_after_the_send_timeout(toy):
    """Round 3: ~200 MB per one-query request whose reply is never read (12 requests: +3.1 GB)."""
    app = create_app(LocalBlackBox(toy), {B: KeySpec(queries=10)})
    with running_server(app, send_timeout=1.0) as url:
        ids = _ids(url, B, 1) * 20_000
        body = json.dumps({"image_ids": ids, "classnames": [f"class {i}" for i in range(200)]}).encode()
        reply_bytes = 4 * len(ids) * 200  # 16 MB of float32, far beyond the kernel's socket buffers
        host, port = url.removeprefix("http://").split(":")
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads nothing
        s.settimeout(10)
        s.connect((host, int(port)))
        s.sendall(
            f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {B}\r\nAccept: application/octet-stream"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(3.0)  # the reply stalls in the server's write buffer for longer than the send timeout
        received = 0
        try:
            while chunk := s.recv(2**20):
                received += len(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        s.close()
        assert 0 < received < reply_bytes  # the start of the reply, then the server let go of the rest
        assert key_box(app, B).budget.used == 1  # it was computed and charged: the client asked for it
        assert httpx.get(f"{url}/v1/usage", headers={"X-API-Key": B}).status_code == 200


def test_a_key_with_too_many_requests_in_flight_is_told_to_wait(toy):
    app = create_app(LocalBlackBox(toy), {A: KeySpec(queries=10), B: KeySpec(queries=10)}, max_in_flight=2)
    with running_server(app) as url:
        ids = _ids(url, A, 1)
        host, port = url.removeprefix("http://").split(":")
        host_port = (host, int(port))
        held = []
        for _ in range(2):  # two of A's requests whose bodies have not arrived yet: both in flight
            s = socket.create_connection(host_port, timeout=5)
            s.sendall(
                f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nX-API-Key: {A}\r\nContent-Type: application/json\r\n"
                'Content-Length: 5000\r\n\r\n{"image_ids": ['.encode()
            )
            held.append(s)
        time.sleep(0.3)
        third = _post(url, "/predict", {"image_ids": ids, "classnames": ["circle", "square"]}, key=A)
        assert third.status_code == 429 and third.json()["what"] == "requests" and third.headers["retry-after"]
        with pytest.raises(RuntimeError, match="in flight"):
            HttpBlackBox(url, A).predict(PredictRequest(ids, ["circle", "square"]))
        assert httpx.get(f"{url}/v1/usage", headers={"X-API-Key": B}).status_code == 200  # other keys are served
        assert key_box(app, A).budget.used == 0  # refused before anything was charged
        for s in held:
            s.close()
        time.sleep(0.3)  # their slots are given back when the connections go
        assert _post(url, "/predict", {"image_ids": ids, "classnames": ["circle", "square"]}, key=A).status_code == 200
    with pytest.raises(ValueError, match="at least 1"):
        create_app(LocalBlackBox(toy), {A: KeySpec(queries=10)}, max_in_flight=0)


@pytest.mark.parametrize(
    ("shape", "nbytes"),
    [
        ([2**62, 4], 0),  # the product wraps to 0 in int64: numpy's reshape error came back
        ([2**33, 2**33, 2**33, 0], 0),
        ([10**30, 0], 0),  # "Maximum allowed dimension exceeded"
        ([2**70], 64),
        ([2**20, 2**20, 0], 0),  # a legal empty array: refused later, by the request's own checks
        ([-1, 4, 128], 64),
        ([True, 4, 128], 64),
    ],
)
def test_absurd_array_shapes_are_one_line_400s_without_numpy_internals(hostile, shape, nbytes):
    url, app, _ = hostile
    box = key_box(app, B)
    used = box.budget.used
    contexts = {"dtype": "float32", "shape": shape, "data": base64.b64encode(b"\0" * nbytes).decode()}
    r = _post(url, "/predict", {"image_ids": ["x"], "classnames": ["a"], "contexts": contexts}, B)
    assert r.status_code in (400, 422), r.text
    text = r.text.lower()
    internals = ("numpy", "c long", "overflow", "int64", "traceback", "reshape", "maximum allowed dimension")
    assert not any(w in text for w in internals), r.text
    assert box.budget.used == used


def test_the_openapi_schema_declares_every_status_and_body_a_client_meets(hostile):
    url, _, _ = hostile
    schema = httpx.get(f"{url}/openapi.json").json()
    declared = {(v, p): set(op["responses"]) for p, ops in schema["paths"].items() for v, op in ops.items()}
    assert {"400", "401", "404", "408", "413", "422", "429"} <= declared[("post", "/v1/predict")]
    assert {"400", "401", "408", "413", "422", "429"} <= declared[("post", "/v1/images")]
    assert set(schema["components"]["schemas"]["RefusalOut"]["required"]) == {"detail", "what", "used", "limit"}
    unknown = _post(url, "/predict", {"image_ids": ["x"], "classnames": ["a"]}, B)
    assert unknown.status_code == 404 and set(unknown.json()) == {"detail"}
    bad = _post(url, "/predict", {"image_ids": "x", "classnames": ["a"]}, B)
    required = schema["components"]["schemas"]["ValidationError"]["required"]
    assert bad.status_code == 422 and all(set(required) <= set(e) for e in bad.json()["detail"])


def test_an_upload_on_a_full_disk_stores_nothing_and_says_so_in_one_line(toy, tmp_path, monkeypatch):
    import sqlite3

    store = UsageStore(tmp_path / "usage.sqlite")
    app = create_app(LocalBlackBox(toy), {B: KeySpec(queries=10)}, store)
    execute = store.execute

    def full_disk(sql: str, args: tuple) -> int:
        if "uploads" in sql:  # the upload count is the write after the decoding
            raise sqlite3.OperationalError("database or disk is full")
        return execute(sql, args)

    monkeypatch.setattr(store, "execute", full_disk)
    with running_server(app) as url:
        r = _post(url, "/images", {"images": [base64.b64encode(_png()).decode()]}, B)
        assert r.status_code == 503 and r.json() == {"detail": "the service cannot record usage now; try again later"}
        assert key_box(app, B).usage().images == 0  # the image was not kept
        monkeypatch.setattr(store, "execute", execute)
        assert _post(url, "/images", {"images": [base64.b64encode(_png()).decode()]}, B).status_code == 200
        assert key_box(app, B).usage().images == 1 and store.row(key_box(app, B).budget.kid)[2] == 1
    store.close()
