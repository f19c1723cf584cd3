"""Backend ``openai``: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, llama.cpp server, ollama,
LM Studio, hosted APIs), through the ``openai`` client library (``pip install "vlmtune[textgen]"``).

Images travel as base64 data URLs; the API key comes from ``$VLMTUNE_TEXTGEN_API_KEY`` or ``$OPENAI_API_KEY``
(local servers accept any); at most ``concurrency`` requests are in flight; the client retries 408 / 409 / 429 /
5xx with exponential backoff (honouring ``Retry-After``) up to ``retries`` times, and each attempt times out after
``timeout`` seconds. Any other failure ends the stage with one line naming the endpoint and the reason.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from vlmtune.errors import VlmtuneError, require
from vlmtune.textgen.base import GenRequest, GenSettings, clean_text

DEFAULT_ENDPOINT = "http://localhost:8000/v1"


def data_url(image: Image.Image) -> str:
    """An image as a data URL: PNG up to 256 x 256 pixels, JPEG (quality 95) above."""
    buf = io.BytesIO()
    small = image.width * image.height <= 256 * 256
    image.convert("RGB").save(buf, format="PNG" if small else "JPEG", quality=95)
    kind = "png" if small else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(buf.getvalue()).decode()}"


def messages(request: GenRequest) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": request.prompt}]
    if request.image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(request.image)}})
    return [{"role": "user", "content": content}]


class OpenAIBackend:
    """A chat-completions endpoint as a ``TextGenerator``."""

    name = "openai"

    def __init__(
        self,
        model: str,
        endpoint: str | None = None,
        concurrency: int = 8,
        timeout: float = 120.0,
        retries: int = 5,
    ) -> None:
        openai = require("openai", "textgen", "the openai text-generation backend")
        self.model, self.revision = model, "api"
        self.endpoint = endpoint or os.environ.get("VLMTUNE_TEXTGEN_ENDPOINT") or DEFAULT_ENDPOINT
        key = os.environ.get("VLMTUNE_TEXTGEN_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = openai.OpenAI(base_url=self.endpoint, api_key=key, timeout=timeout, max_retries=retries)
        self.concurrency, self.timeout, self.retries = concurrency, timeout, retries
        self._errors = openai

    def _one(self, request: GenRequest, settings: GenSettings) -> str:
        openai = self._errors
        try:
            reply = self.client.chat.completions.create(
                model=self.model,
                messages=messages(request),  # type: ignore[arg-type]
                max_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                seed=settings.seed,
            )
        except openai.APITimeoutError:
            raise VlmtuneError(
                f"text generation at {self.endpoint} timed out ({self.timeout:g} s, {self.retries} retries)"
            ) from None
        except openai.APIConnectionError as exc:
            raise VlmtuneError(f"cannot reach the text-generation endpoint {self.endpoint}: {exc}") from None
        except openai.APIStatusError as exc:
            raise VlmtuneError(
                f"text generation at {self.endpoint} failed: HTTP {exc.status_code} ({exc.message})"
            ) from None
        choice = reply.choices[0].message.content if reply.choices else None
        if choice is None:
            raise VlmtuneError(f"text generation at {self.endpoint}: the reply has no text (model {self.model})")
        return clean_text(choice)

    def generate(self, requests: Sequence[GenRequest], settings: GenSettings) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda r: self._one(r, settings), requests))
