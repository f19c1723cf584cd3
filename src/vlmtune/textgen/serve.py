"""Any ``TextGenerator`` behind the OpenAI chat-completions schema (``vlmtune textgen-serve``, loopback by default).

It lets the ``openai`` backend, and any OpenAI client, be tried offline against the toy describer. Only the part of
the schema the stage uses is served: one user message of text and at most one ``image_url`` (a base64 data URL,
decoded with the black-box service's checks on format and size), ``max_tokens``, ``temperature``, ``top_p``,
``seed``. Generation runs in a worker thread, one request at a time.

It is hardened like ``vlmtune serve`` (docs/service.md): API keys from the same key file (``KeySpec.queries``
counts completions, persisted in a ``UsageStore``; key-less only when ``keys=None`` is asked for explicitly), the
same body limit and body timeout (``BodyLimit``), at most ``max_prompt_chars`` of text, the image parts counted
before any is decoded and decoding off the event loop; ``server_config`` adds the header timeouts and connection
caps.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from vlmtune.blackbox.accounts import KeySpec, UsageStore, key_budget, key_id
from vlmtune.blackbox.api import BudgetExceeded, QueryBudget, ServiceLimits
from vlmtune.blackbox.local import decode_upload
from vlmtune.blackbox.server import (
    DEFAULT_MAX_BODY,
    BodyLimit,
    KeyInFlight,
    docs_page,
    in_flight_limit,
    known_key,
    schema_errors,
)
from vlmtune.blackbox.wire import decode_image
from vlmtune.textgen.base import GenRequest, GenSettings, TextGenerator

MAX_PROMPT_CHARS = 32_000  # the text of one request (a long LMM prompt is ~2,000)


class ChatRequest(BaseModel):
    model: str = Field(max_length=200)
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=16)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


def parse_request(body: ChatRequest, limits: ServiceLimits, max_prompt_chars: int = MAX_PROMPT_CHARS) -> GenRequest:
    """The last user message as a ``GenRequest`` (text parts joined, one image at most). Every part is checked and
    the images counted before the one image is decoded; anything malformed raises ``ValueError``."""
    user = [m for m in body.messages if m.get("role") == "user"]
    if not user:
        raise ValueError("no user message")
    content = user[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise ValueError("content must be a string or a list of parts")
    texts, urls = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            url = part["image_url"].get("url")
            if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
                raise ValueError("images must be base64 data URLs")
            urls.append(url)
        else:
            raise ValueError("unsupported content part: expected {'type': 'text'} or {'type': 'image_url'}")
    if len(urls) > 1:
        raise ValueError("at most one image per request")
    text = " ".join(texts)
    if len(text) > max_prompt_chars:
        raise ValueError(f"prompt of {len(text)} characters; the limit is {max_prompt_chars}")
    image = decode_upload(decode_image(urls[0].split(";base64,", 1)[1]), limits) if urls else None
    return GenRequest(text, image)


def chat_app(
    generator: TextGenerator,
    keys: Mapping[str, KeySpec | QueryBudget] | None,
    limits: ServiceLimits | None = None,
    store: UsageStore | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    body_timeout: float = 30.0,
    max_prompt_chars: int = MAX_PROMPT_CHARS,
    max_in_flight: int = 4,
) -> Any:
    """The ASGI app serving ``POST /v1/chat/completions`` and ``GET /v1/models`` for ``generator``: to the holders
    of ``keys`` (a completion is one query of the key's budget, in ``store`` when given), or to anyone when
    ``keys`` is None (asked for explicitly), at most ``max_in_flight`` requests of a key at a time. ``.app`` is the
    FastAPI app inside the body limit."""
    limits = limits or ServiceLimits()
    app = FastAPI(title=f"vlmtune text generation ({generator.name}: {generator.model})", docs_url=None, redoc_url=None)
    lock = threading.Lock()
    budgets = {key_id(key): key_budget(key, spec, store) for key, spec in (keys or {}).items()}
    app.add_middleware(KeyInFlight, accounts=budgets, limit=in_flight_limit(max_in_flight))

    def account(
        authorization: str | None = Header(default=None), x_api_key: str | None = Header(default=None)
    ) -> QueryBudget | None:
        return None if keys is None else known_key(budgets, authorization, x_api_key)

    def run(body: ChatRequest, budget: QueryBudget | None) -> str:
        req = parse_request(body, limits, max_prompt_chars)  # decoded here, in the worker thread
        settings = GenSettings(body.max_tokens or 77, body.temperature, body.top_p, body.seed or 0)
        if budget is not None:
            budget.charge(1)  # over budget: BudgetExceeded (429), nothing generated
        try:
            with lock:
                return generator.generate([req], settings)[0]
        except Exception:
            if budget is not None:
                budget.refund(1)
            raise

    @app.exception_handler(BudgetExceeded)
    async def _budget(_: Request, exc: BudgetExceeded) -> JSONResponse:
        return JSONResponse({"error": {"message": str(exc), "type": "budget"}}, status_code=429)

    @app.exception_handler(ValueError)
    async def _bad(_: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"error": {"message": str(exc)[:500], "type": "invalid_request"}}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _schema(_: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in schema_errors(exc))
        return JSONResponse({"error": {"message": where[:500], "type": "invalid_request"}}, status_code=422)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:  # offline: nothing from a CDN
        return HTMLResponse(docs_page(app.openapi()))

    @app.get("/v1/models")
    def models(_: QueryBudget | None = Depends(account)) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": generator.model, "object": "model", "owned_by": "vlmtune"}]}

    @app.post("/v1/chat/completions")
    async def complete(body: ChatRequest, budget: QueryBudget | None = Depends(account)) -> dict[str, Any]:
        text = await asyncio.to_thread(run, body, budget)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": generator.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": len(text.split()), "total_tokens": len(text.split())},
        }

    return BodyLimit(app, max_body_bytes, body_timeout)
