"""``vlmtune serve``: the reference black box, an HTTP service that exposes only predictions.

- API keys (``Authorization: Bearer <key>`` or ``X-API-Key``), each with its own hard query budget;
- ``POST /v1/images`` uploads images once (the server keeps their features), ``POST /v1/predict`` scores them
  against class prompts with optional prompt contexts, ``GET /v1/usage`` and ``GET /v1/info``; OpenAPI docs at
  ``/docs``;
- every input is validated: bad shapes, dtypes, NaN/inf, unknown image ids, oversized bodies get 4xx and the
  server keeps serving; an over-budget request gets 429 and costs no model work.
- binds 127.0.0.1 by default.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import secrets
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from vlmtune.blackbox.api import BudgetExceeded, PredictRequest, QueryBudget
from vlmtune.blackbox.local import LocalBlackBox
from vlmtune.blackbox.wire import API_PREFIX, decode_array, decode_image, encode_array

log = logging.getLogger(__name__)
DEFAULT_MAX_BODY = 32 * 2**20


class ArrayIn(BaseModel):
    dtype: Literal["float32"]
    shape: list[int] = Field(max_length=4)
    data: str


class ImagesIn(BaseModel):
    images: list[str] = Field(min_length=1, max_length=1024, description="base64-encoded PNG/JPEG files")


class PredictIn(BaseModel):
    image_ids: list[str] = Field(min_length=1, max_length=100_000)
    classnames: list[str] = Field(min_length=1, max_length=10_000)
    template: str = Field(default="a photo of a {}.", max_length=500)
    contexts: ArrayIn | None = Field(default=None, description="(C, n_ctx, d_tok) float32 prompt contexts")
    mode: Literal["add", "replace"] = "add"
    visual_contexts: ArrayIn | None = Field(
        default=None, description="(C, n_v, d_vis) float32 visual prompt tokens (ViT services started with them)"
    )


class BodyLimit:
    """ASGI middleware: requests whose body exceeds ``max_bytes`` get 413 before they are parsed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await JSONResponse({"detail": "request body too large"}, status_code=413)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, "request body too large")
            return message

        return await self.app(scope, limited, send)


def create_app(box: LocalBlackBox, budgets: dict[str, QueryBudget], max_body_bytes: int = DEFAULT_MAX_BODY) -> Any:
    """The FastAPI app serving ``box`` to the holders of ``budgets``' keys."""
    if not budgets:
        raise ValueError("the service needs at least one API key")
    app = FastAPI(title="vlmtune black-box VLM", version="1", description=__doc__)

    def api_key(authorization: str | None = Header(default=None), x_api_key: str | None = Header(default=None)) -> str:
        given = x_api_key or (authorization.removeprefix("Bearer ").strip() if authorization else "")
        for key in budgets:
            if given and hmac.compare_digest(given.encode(), key.encode()):
                return key
        raise HTTPException(401, "missing or unknown API key")

    @app.exception_handler(BudgetExceeded)
    async def _budget(_: Request, exc: BudgetExceeded) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "used": exc.used, "limit": exc.limit}, status_code=429)

    @app.exception_handler(ValueError)
    async def _bad(_: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(KeyError)
    async def _missing(_: Request, exc: KeyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc.args[0]) if exc.args else "not found"}, status_code=404)

    @app.get(f"{API_PREFIX}/info")
    def info(key: str = Depends(api_key)) -> dict[str, Any]:
        return dataclasses.asdict(box.info())

    @app.post(f"{API_PREFIX}/images")
    def upload(body: ImagesIn, key: str = Depends(api_key)) -> dict[str, Any]:
        return {"ids": box.upload([decode_image(b) for b in body.images])}

    @app.post(f"{API_PREFIX}/predict")
    def predict(body: PredictIn, key: str = Depends(api_key)) -> dict[str, Any]:
        arrays = (body.contexts, body.visual_contexts)
        contexts, visual = (decode_array(a.model_dump()) if a is not None else None for a in arrays)
        request = PredictRequest(body.image_ids, body.classnames, body.template, contexts, body.mode, visual)
        scores = box.predict(request, budgets[key])
        return {"scores": encode_array(scores), "used": budgets[key].used, "limit": budgets[key].limit}

    @app.get(f"{API_PREFIX}/usage")
    def usage(key: str = Depends(api_key)) -> dict[str, Any]:
        b = budgets[key]
        return {"used": b.used, "limit": b.limit, "images": box.usage().images}

    return BodyLimit(app, max_body_bytes)


def load_keys(path: str | Path | None, default_budget: int | None) -> dict[str, QueryBudget]:
    """``{"key": budget or null, ...}`` from a JSON file, or one fresh random key with ``default_budget``."""
    if path is None:
        key = secrets.token_urlsafe(24)
        log.warning("no --keys file: generated API key %s (budget %s)", key, default_budget)
        return {key: QueryBudget(default_budget)}
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a JSON object of key -> budget")
    return {str(k): QueryBudget(None if v is None else int(v)) for k, v in data.items()}
