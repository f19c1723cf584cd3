"""``vlmtune serve``: the reference black box, an HTTP service that exposes only predictions.

- API keys (``Authorization: Bearer <key>`` or ``X-API-Key``), each with its own namespace of uploads, hard query
  (and optional work) budget and image quota; usage persists in SQLite (``accounts.UsageStore``);
- ``POST /v1/images`` uploads PNG/JPEG/WebP images once (the server keeps their features), ``POST /v1/predict``
  scores them against class prompts with optional prompt contexts (JSON, or raw float32 with
  ``Accept: application/octet-stream``), ``GET /v1/usage`` and ``GET /v1/info``; offline docs at ``/docs``;
- every request is validated in full before anything is charged (shapes, values, work and reply size), a
  request that fails after its charge is refunded, and errors never echo the input;
- bounded: body size, body read time, time to send the request head, time a reply may stall unread, concurrent
  connections, requests in flight per key; one model computation at a time, in slices granted round-robin over
  the keys that wait; binds 127.0.0.1 by default.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import logging
import sqlite3
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from vlmtune.blackbox.accounts import KeySpec, UsageStore, key_budget, key_id
from vlmtune.blackbox.api import BudgetExceeded, PredictRequest, QueryBudget, UnknownImages
from vlmtune.blackbox.local import LocalBlackBox
from vlmtune.blackbox.wire import API_PREFIX, BINARY, MAX_ARRAY_BYTES, decode_array, decode_image, encode_array

T = TypeVar("T")
log = logging.getLogger(__name__)
DEFAULT_MAX_BODY = 32 * 2**20
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ArrayIn(BaseModel):
    dtype: Literal["float32"]
    shape: list[int] = Field(max_length=5)
    data: str


class ImagesIn(BaseModel):
    images: list[str] = Field(min_length=1, max_length=1024, description="base64-encoded PNG/JPEG/WebP files")


class PredictIn(BaseModel):
    image_ids: list[str] = Field(min_length=1, max_length=100_000)
    classnames: list[str] = Field(min_length=1, max_length=100_000)
    template: str = Field(default="a photo of a {}.", max_length=1000)
    contexts: ArrayIn | None = Field(default=None, description="(C, n_ctx, d_tok) float32 prompt contexts")
    mode: Literal["add", "replace"] = "add"
    visual_contexts: ArrayIn | None = Field(
        default=None, description="(C, n_v, d_vis) float32 visual prompt tokens (ViT services started with them)"
    )
    pixel_prompts: ArrayIn | None = Field(
        default=None, description="(C, N, 3, S, S) float32 per-image pixel prompts (services started with them)"
    )


class ErrorOut(BaseModel):
    detail: str


class RefusalOut(BaseModel):
    detail: str
    what: str = Field(description='"query", "work" or "images" (a budget or quota), "requests" (in flight)')
    used: int
    limit: int | None


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route's error status codes (every body holds a one-line ``detail``)."""
    what = {
        400: "invalid request (limits, shapes, values)",
        401: "missing or unknown API key",
        404: "unknown image ids",
        408: "request body not received in time",
        413: "request body or reply too large",
        429: "budget, quota or requests in flight exhausted; nothing was charged",
        500: "internal error (no details)",
        503: "usage cannot be recorded now (the service's disk is full or read-only); nothing was stored",
    }
    return {c: {"model": RefusalOut if c == 429 else ErrorOut, "description": what[c]} for c in codes}


def schema_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """A 422's ``detail``: where and what, in FastAPI's ``ValidationError`` shape, never the input itself."""
    return [
        {"loc": [str(p) for p in e.get("loc", ())][:4], "msg": str(e.get("msg", ""))[:200], "type": str(e.get("type"))}
        for e in exc.errors()[:10]
    ]


class BodyLimit:
    """ASGI middleware: bodies over ``max_bytes`` get 413 before they are parsed; a body that does not arrive
    within ``timeout`` seconds gets 408 (half-sent requests do not hold the server)."""

    def __init__(self, app: Any, max_bytes: int, timeout: float = 30.0) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await JSONResponse({"detail": "request body too large"}, status_code=413)(scope, receive, send)
        seen = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout

        async def limited() -> dict:
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise HTTPException(408, "request body not received in time") from None
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, "request body too large")
            return message

        return await self.app(scope, limited, send)


class KeyInFlight:
    """ASGI middleware: at most ``limit`` requests of one known key in flight at a time, each counted from its
    head to the last byte of its reply (a reply the client does not read stays counted); beyond that, 429 with
    ``what: "requests"`` and nothing is charged. One key cannot take every worker thread, nor hold many
    unread replies. Requests without a known key pass (they get their 401 inside)."""

    def __init__(self, app: Any, accounts: Mapping[str, Any], limit: int = 4) -> None:
        self.app, self.accounts, self.limit = app, accounts, limit
        self.in_flight: Counter[str] = Counter()  # key hash -> its requests in flight (the event loop's thread)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        given = given_key(
            *(headers[h].decode("latin-1") if h in headers else None for h in (b"authorization", b"x-api-key"))
        )
        key = key_id(given) if given else None
        if key is None or key not in self.accounts:
            return await self.app(scope, receive, send)
        if self.in_flight[key] >= self.limit:
            body = {
                "detail": f"{self.limit} requests of this key are in flight; wait for their replies",
                "what": "requests",
                "used": self.in_flight[key],
                "limit": self.limit,
            }
            return await JSONResponse(body, status_code=429, headers={"Retry-After": "1"})(scope, receive, send)
        self.in_flight[key] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[key] -= 1
            if self.in_flight[key] <= 0:
                del self.in_flight[key]


def in_flight_limit(limit: int) -> int:
    if limit < 1:
        raise ValueError(f"max_in_flight is {limit}: at least 1 request per key must be allowed")
    return limit


def given_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request sends (``X-API-Key``, else ``Authorization: Bearer``), if any."""
    if x_api_key is None and authorization is not None:
        scheme, _, value = authorization.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    return x_api_key


def known_key(accounts: Mapping[str, T], authorization: str | None, x_api_key: str | None) -> T:
    """What ``accounts`` (key hash -> account) holds for the key of a request (``X-API-Key`` or
    ``Authorization: Bearer``); 401 when missing or unknown. The key is hashed before the lookup, which reveals
    nothing of it."""
    given = given_key(authorization, x_api_key)
    found = accounts.get(key_id(given)) if given else None
    if found is None:
        raise HTTPException(401, "missing or unknown API key (send 'Authorization: Bearer <key>')")
    return found


def docs_page(schema: dict[str, Any]) -> str:
    """A self-contained HTML page of the API from its OpenAPI schema (no JavaScript, nothing from a CDN)."""
    rows = []
    for path, ops in schema.get("paths", {}).items():
        for verb, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            name = body.get("$ref", "").rsplit("/", 1)[-1]
            rows.append(
                f"<tr><td><code>{verb.upper()} {html.escape(path)}</code></td>"
                f"<td>{html.escape(op.get('summary', ''))}</td><td>{html.escape(name)}</td></tr>"
            )
    models = []
    for name, model in schema.get("components", {}).get("schemas", {}).items():
        kinds = {
            k: str(v.get("type", v.get("$ref", "object"))).rsplit("/", 1)[-1]
            for k, v in model.get("properties", {}).items()
        }
        props = ", ".join(f"<code>{html.escape(k)}</code>: {html.escape(t)}" for k, t in kinds.items())
        models.append(f"<li><b>{html.escape(name)}</b>: {props}</li>")
    info = schema.get("info", {})
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(info.get('title', ''))}</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td{padding:.2em .8em}</style></head>"
        f"<body><h1>{html.escape(info.get('title', ''))}</h1><pre>{html.escape(info.get('description', ''))}</pre>"
        "<table><tr><th>endpoint</th><th>what</th><th>body</th></tr>" + "".join(rows) + "</table>"
        "<h2>Bodies</h2><ul>" + "".join(models) + "</ul><p>Machine-readable: <a href='/openapi.json'>"
        "/openapi.json</a></p></body></html>"
    )


def create_app(
    box: LocalBlackBox,
    keys: Mapping[str, KeySpec | QueryBudget],
    store: UsageStore | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    body_timeout: float = 30.0,
    max_in_flight: int = 4,
) -> Any:
    """The ASGI app serving ``box`` to the holders of ``keys`` (``.app``: the FastAPI app inside the body limit).

    Each key gets its own namespace (``box.fork``): its uploads, its budget (a ``QueryBudget`` given directly, or
    the account of its ``KeySpec`` in ``store``, in memory without a store), its image quota and at most
    ``max_in_flight`` requests at a time (``KeyInFlight``); keys take turns on the model (``blackbox.turns``).
    """
    if not keys:
        raise ValueError("the service needs at least one API key")
    box.with_body_limit(max_body_bytes)
    boxes: dict[str, LocalBlackBox] = {}
    for key, spec in keys.items():
        quota = None if isinstance(spec, QueryBudget) else spec.images
        boxes[key_id(key)] = box.fork(key_budget(key, spec, store), quota)
    app = FastAPI(title="vlmtune black-box VLM", version="1", description=__doc__, docs_url=None, redoc_url=None)
    app.state.boxes = boxes  # key hash -> that key's box (for operators and tests)
    app.add_middleware(KeyInFlight, accounts=boxes, limit=in_flight_limit(max_in_flight))

    def key_box(
        authorization: str | None = Header(default=None), x_api_key: str | None = Header(default=None)
    ) -> LocalBlackBox:
        return known_key(boxes, authorization, x_api_key)

    @app.exception_handler(BudgetExceeded)
    async def _budget(_: Request, exc: BudgetExceeded) -> JSONResponse:
        body = {"detail": str(exc), "what": exc.what, "used": exc.used, "limit": exc.limit}
        return JSONResponse(body, status_code=429)

    @app.exception_handler(ValueError)
    async def _bad(_: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)[:500]}, status_code=400)

    @app.exception_handler(UnknownImages)
    async def _missing(_: Request, exc: UnknownImages) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(RequestValidationError)
    async def _schema(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": schema_errors(exc)}, status_code=422)  # never the input itself

    @app.exception_handler(sqlite3.Error)
    async def _usage_store(_: Request, exc: sqlite3.Error) -> JSONResponse:
        log.error("the usage database failed: %s", exc)  # a full or read-only disk: the operator's to fix
        return JSONResponse({"detail": "the service cannot record usage now; try again later"}, status_code=503)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse({"detail": "internal error"}, status_code=500)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(docs_page(app.openapi()))

    @app.get(
        f"{API_PREFIX}/info",
        summary="the served model's public name, widths and request limits",
        responses=_errors(401),
    )
    def info(kbox: LocalBlackBox = Depends(key_box)) -> dict[str, Any]:
        return dataclasses.asdict(kbox.info())

    @app.post(
        f"{API_PREFIX}/images",
        summary="upload images (PNG/JPEG/WebP) -> content ids for this key",
        responses=_errors(400, 401, 408, 413, 429, 500, 503),
    )
    def upload(body: ImagesIn, kbox: LocalBlackBox = Depends(key_box)) -> dict[str, Any]:
        return {"ids": kbox.upload([decode_image(b) for b in body.images])}

    @app.post(
        f"{API_PREFIX}/predict",
        summary="scores (C, N, K) of uploaded images against class prompts",
        responses=_errors(400, 401, 404, 408, 413, 429, 500, 503),
    )
    def predict(body: PredictIn, request: Request, kbox: LocalBlackBox = Depends(key_box)) -> Any:
        arrays = (body.contexts, body.visual_contexts, body.pixel_prompts)
        contexts, visual, pixels = (decode_array(a.model_dump()) if a is not None else None for a in arrays)
        req = PredictRequest(body.image_ids, body.classnames, body.template, contexts, body.mode, visual, pixels)
        binary = BINARY in request.headers.get("accept", "")
        req.validate(kbox.info())  # limits first (400), then the JSON reply size (413): nothing is charged before
        if not binary and 4 * req.n_values > MAX_ARRAY_BYTES:  # refused before any charge
            raise HTTPException(413, f"a JSON reply holds at most {MAX_ARRAY_BYTES // 4} scores: ask for {BINARY}")
        scores = kbox.predict(req)
        used, limit = kbox.budget.used, kbox.budget.limit
        if binary:
            headers = {"X-Shape": ",".join(map(str, scores.shape)), "X-Used": str(used), "X-Limit": str(limit)}
            return Response(scores.astype("<f4").tobytes(), media_type=BINARY, headers=headers)
        return {"scores": encode_array(scores), "used": used, "limit": limit}

    @app.get(
        f"{API_PREFIX}/usage", summary="this key's queries, work, images held and uploaded", responses=_errors(401)
    )
    def usage(kbox: LocalBlackBox = Depends(key_box)) -> dict[str, Any]:
        u = kbox.usage()
        return {
            "used": u.used,
            "limit": u.limit,
            "work": u.work,
            "work_limit": u.work_limit,
            "images": u.images,
            "image_quota": u.image_quota,
            "uploaded": u.uploaded,
        }

    return BodyLimit(app, max_body_bytes, body_timeout)


def server_config(
    app: Any,
    host: str,
    port: int,
    header_timeout: float = 10.0,
    max_connections: int = 512,
    log_level: str = "warning",
    max_per_address: int = 64,
    send_timeout: float = 30.0,
) -> Any:
    """A uvicorn config that drops a connection whose next request head does not arrive within ``header_timeout``
    seconds of its opening or of its last response (uvicorn alone waits forever for a half-sent head, and a trickled
    head on a kept-alive connection cancels its keep-alive timer), closes connections beyond ``max_per_address``
    from one address, aborts a connection whose reply has not drained below the write buffer's mark for
    ``send_timeout`` seconds (a client that never reads would hold the whole reply in memory), and answers 503
    beyond ``max_connections`` in all."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    open_from: Counter[str] = Counter()  # connections held per peer address (the event loop's thread only)

    class TimedH11Protocol(H11Protocol):
        peer: str | None = None
        _stalled = 0  # counts pauses and resumes of writing: a pause still current when its timer fires drops

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            address = (transport.get_extra_info("peername") or ("?",))[0]
            if open_from[address] >= max_per_address:
                transport.close()
                return
            self.peer = address
            open_from[address] += 1
            self._await_head(None)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.peer is not None:
                open_from[self.peer] -= 1
                if open_from[self.peer] <= 0:
                    del open_from[self.peer]
                self.peer = None
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            previous = self.cycle  # a pipelined request may start a new cycle inside the call below
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_head(previous)

        def _await_head(self, previous: Any) -> None:
            self.loop.call_later(header_timeout, self._drop_if_no_new_request, previous)

        def _drop_if_no_new_request(self, previous: Any) -> None:
            if self.cycle is previous and not self.transport.is_closing():
                self.transport.close()

        def pause_writing(self) -> None:  # the reply fills the write buffer: the client must read within the time
            super().pause_writing()
            self._stalled += 1
            self.loop.call_later(send_timeout, self._drop_if_still_stalled, self._stalled)

        def resume_writing(self) -> None:
            super().resume_writing()
            self._stalled += 1

        def _drop_if_still_stalled(self, stalled: int) -> None:
            if self._stalled == stalled and not self.transport.is_closing():
                self.transport.abort()  # discards the buffered reply; the request's send returns

    if host not in LOOPBACK:
        log.warning(
            "serving on %s: reachable from the network, without TLS; put a TLS proxy in front and keep keys secret",
            host,
        )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=TimedH11Protocol,
        limit_concurrency=max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=3,  # Ctrl-C: requests in flight get 3 s, then the server stops
        log_level=log_level,
    )
