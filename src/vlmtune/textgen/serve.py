"""Any ``TextGenerator`` behind the OpenAI chat-completions schema (``vlmtune textgen-serve``, loopback by default).

It lets the ``openai`` backend, and any OpenAI client, be tried offline against the toy describer. Only the part of
the schema the stage uses is served: one user message of text and at most one ``image_url`` (a base64 data URL,
decoded with the black-box service's checks on format and size), ``max_tokens``, ``temperature``, ``top_p``,
``seed``. Generation runs in a worker thread, one request at a time.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from vlmtune.blackbox.api import ServiceLimits
from vlmtune.blackbox.local import decode_upload
from vlmtune.blackbox.wire import decode_image
from vlmtune.textgen.base import GenRequest, GenSettings, TextGenerator


class ChatRequest(BaseModel):
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=16)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0)


def parse_request(body: ChatRequest, limits: ServiceLimits) -> GenRequest:
    """The last user message as a ``GenRequest`` (text parts joined, one image at most)."""
    user = [m for m in body.messages if m.get("role") == "user"]
    if not user:
        raise ValueError("no user message")
    content = user[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise ValueError("content must be a string or a list of parts")
    texts, images = [], []
    for part in parts:
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") == "image_url":
            url = str((part.get("image_url") or {}).get("url", ""))
            if not url.startswith("data:image/") or ";base64," not in url:
                raise ValueError("images must be base64 data URLs")
            images.append(decode_upload(decode_image(url.split(";base64,", 1)[1]), limits))
        else:
            raise ValueError(f"unsupported content part {part.get('type')!r}")
    if len(images) > 1:
        raise ValueError("at most one image per request")
    return GenRequest(" ".join(texts), images[0] if images else None)


def chat_app(generator: TextGenerator, limits: ServiceLimits | None = None) -> FastAPI:
    """A FastAPI app serving ``POST /v1/chat/completions`` and ``GET /v1/models`` for ``generator``."""
    limits = limits or ServiceLimits()
    app = FastAPI(title=f"vlmtune text generation ({generator.name}: {generator.model})")
    lock = threading.Lock()

    def run(req: GenRequest, settings: GenSettings) -> str:
        with lock:
            return generator.generate([req], settings)[0]

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": generator.model, "object": "model", "owned_by": "vlmtune"}]}

    @app.post("/v1/chat/completions")
    async def complete(body: ChatRequest) -> dict[str, Any]:
        try:
            req = parse_request(body, limits)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        settings = GenSettings(body.max_tokens or 77, body.temperature, body.top_p, body.seed or 0)
        text = await asyncio.to_thread(run, req, settings)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": generator.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": len(text.split()), "total_tokens": len(text.split())},
        }

    return app
