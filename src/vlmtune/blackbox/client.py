"""``HttpBlackBox``: the ``BlackBoxVLM`` protocol over the HTTP service (``vlmtune serve``).

Requests are split to fit the service's advertised limits (``/v1/info``): uploads by count and by bytes, score
requests by candidates (each candidate is still one query), replies come back as raw float32. A request without
contexts whose reply would be too large is split by images (one query per part), and so is a request whose pixel
prompts would not fit one body (one query per candidate and part: each is a forward the service computes).
"""

from __future__ import annotations

import io
import math
from dataclasses import replace
from typing import Any

import numpy as np

from vlmtune.blackbox.api import BudgetExceeded, ModelInfo, PredictRequest, UnknownImages, Usage
from vlmtune.blackbox.wire import API_PREFIX, BINARY, decode_array, decode_binary, encode_array, encode_image
from vlmtune.errors import require

_OVERHEAD = 4096  # bytes of a request body besides its payload (keys, brackets, template)


def header_pixels(data: bytes) -> int:
    """Width x height from an image file's header (nothing decoded); 0 when unreadable (the service says why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return int(im.size[0] * im.size[1])
    except Exception:  # Pillow raises many types for bad files
        return 0


class HttpBlackBox:
    """Client of a vlmtune black-box service.

    Args:
        url: service root, e.g. ``http://127.0.0.1:8765``.
        api_key: the key the service issued.
        timeout: seconds per request.
        upload_batch: the most images per upload request (fewer when the service's body limit needs it).
        retries: connection retries (httpx's transport; answers are never retried, so nothing is charged twice).
    """

    def __init__(
        self, url: str, api_key: str, timeout: float = 120.0, upload_batch: int = 256, retries: int = 2
    ) -> None:
        httpx = require("httpx", "serve", "the HTTP black-box client")
        if not api_key:
            raise ValueError("an API key is needed (--api-key or $VLMTUNE_API_KEY)")
        self._client = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=httpx.HTTPTransport(retries=retries),
        )
        self.url, self.upload_batch = url, upload_batch
        self._info: ModelInfo | None = None
        self.requests = 0  # HTTP requests sent (tests)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            r = self._client.request(method, f"{API_PREFIX}{path}", **kwargs)
        except httpx.TransportError as exc:
            raise ConnectionError(f"cannot reach the black-box service at {self.url}: {exc}") from None
        self.requests += 1
        if r.status_code == 200:
            if r.headers.get("content-type", "").startswith(BINARY):
                return decode_binary(r.content, r.headers.get("x-shape", ""))
            return r.json()
        is_json = r.headers.get("content-type", "").startswith("application/json")
        body = r.json() if is_json else {}
        detail = body.get("detail", r.text[:300]) if isinstance(body, dict) else r.text[:300]
        if r.status_code == 429 and body.get("what") == "requests":  # not charged: a concurrency limit
            raise RuntimeError(
                f"the service at {self.url} refused: {detail} "
                "(fewer clients per key, or the operator raises --max-in-flight)"
            )
        if r.status_code == 429:
            raise BudgetExceeded(0, int(body.get("used", 0)), int(body.get("limit") or 0), body.get("what", "query"))
        if r.status_code == 404:
            raise UnknownImages(str(detail))
        if r.status_code == 401:
            raise PermissionError(f"the service at {self.url} refused the API key")
        if r.status_code in (400, 408, 413, 422):
            raise ValueError(f"service rejected the request ({r.status_code}): {detail}")
        raise RuntimeError(f"service error {r.status_code}: {detail}")

    def info(self) -> ModelInfo:
        if self._info is None:
            self._info = ModelInfo(**self._call("GET", "/info"))
        return self._info

    def upload(self, images: list[bytes]) -> list[str]:
        """Upload in requests that fit the service's image count, pixel budget and body size limits."""
        info = self.info()
        per_request = min(self.upload_batch, int(info.limits.get("max_upload_images", self.upload_batch)))
        max_pixels = int(info.limits.get("max_upload_pixels", 2**62))
        room = (info.max_body_bytes or 2**62) - _OVERHEAD
        ids: list[str] = []
        chunk: list[str] = []
        size = pixels = 0
        for i, data in enumerate(images):
            text = encode_image(data)
            if len(text) + 4 > room:
                raise ValueError(
                    f"image {i} is {len(data)} bytes: over the service's {info.max_body_bytes}-byte body limit"
                )
            area = header_pixels(data)
            if chunk and (len(chunk) >= per_request or size + len(text) + 4 > room or pixels + area > max_pixels):
                ids += self._call("POST", "/images", json={"images": chunk})["ids"]
                chunk, size, pixels = [], 0, 0
            chunk.append(text)
            size += len(text) + 4
            pixels += area
        if chunk:
            ids += self._call("POST", "/images", json={"images": chunk})["ids"]
        return ids

    def predict(self, request: PredictRequest) -> np.ndarray:
        """Scores (C, N, K), in as many requests as the service's limits need (C queries in all)."""
        lim = self.info().service_limits
        n, k = len(request.image_ids), len(request.classnames)
        if (
            request.contexts is None
            and request.visual_contexts is None
            and (n * k > lim.max_reply_values or n > lim.max_images)
        ):
            step = max(1, lim.images_per_request(k))  # one query per part
            parts = [self._send(replace(request, image_ids=request.image_ids[i : i + step])) for i in range(0, n, step)]
            return np.concatenate(parts, axis=1)
        if request.pixel_prompts is not None:  # a part's images: one candidate's pixel prompts fit one request
            step = self._pixel_images_per_request(request)
            if step < n:
                pp = request.pixel_prompts
                cuts = [slice(i, i + step) for i in range(0, n, step)]
                parts = [
                    self._by_candidates(replace(request, image_ids=request.image_ids[c], pixel_prompts=pp[:, c]))
                    for c in cuts
                ]
                return np.concatenate(parts, axis=1)
        return self._by_candidates(request)

    def _pixel_images_per_request(self, request: PredictRequest) -> int:
        assert request.pixel_prompts is not None
        return self.pixel_images_per_request(request.classnames, int(np.prod(request.pixel_prompts.shape[2:])))

    def pixel_images_per_request(self, classnames: list[str], values_per_image: int | None = None) -> int:
        """The most images whose pixel prompts (one candidate; ``values_per_image`` = 3 x S x S by default) fit
        one request within the service's limits and body size."""
        info = self.info()
        one = values_per_image or 3 * (info.image_size or 1) ** 2
        step = info.service_limits.images_per_request(len(classnames), one)
        if info.max_body_bytes is not None:
            room = info.max_body_bytes - _OVERHEAD - sum(len(c) + 3 for c in classnames)
            step = min(step, math.floor(room / (one * 4 * 4 / 3 + 30)))  # base64 float32 + the id
        if step < 1:
            raise ValueError("one image's pixel prompt does not fit the service's request limits")
        return step

    def _by_candidates(self, request: PredictRequest) -> np.ndarray:
        """Scores (C, N, K) in requests of as many candidates as fit."""
        per = self._candidates_per_request(request)
        c = request.n_candidates
        if per >= c:
            return self._send(request)
        parts = []
        for start in range(0, c, per):
            cut = slice(start, start + per)
            parts.append(
                self._send(
                    replace(
                        request,
                        contexts=request.contexts[cut] if request.contexts is not None else None,
                        visual_contexts=request.visual_contexts[cut] if request.visual_contexts is not None else None,
                        pixel_prompts=request.pixel_prompts[cut] if request.pixel_prompts is not None else None,
                    )
                )
            )
        return np.concatenate(parts)

    def _candidates_per_request(self, request: PredictRequest) -> int:
        info = self.info()
        lim = info.service_limits
        n, k = len(request.image_ids), len(request.classnames)
        pixels = request.pixel_prompts[0, 0].size if request.pixel_prompts is not None else 0
        per = lim.candidates_per_request(n, k, pixels, reencoded=request.visual_contexts is not None)
        if info.max_body_bytes is not None:
            fixed = _OVERHEAD + sum(len(i) + 3 for i in request.image_ids) + sum(len(c) + 3 for c in request.classnames)
            arrays = (request.contexts, request.visual_contexts, request.pixel_prompts)
            one = sum(a[0].size * 4 * 4 / 3 for a in arrays if a is not None)
            per = min(per, math.floor((info.max_body_bytes - fixed) / one) if one else per)
        if per < 1:
            raise ValueError(
                f"one candidate on {n} images x {k} classes exceeds the service's limits "
                f"(max_reply_values {lim.max_reply_values}, max_images {lim.max_images}); use fewer images"
            )
        return per

    def _send(self, request: PredictRequest) -> np.ndarray:
        body: dict[str, Any] = {
            "image_ids": request.image_ids,
            "classnames": request.classnames,
            "template": request.template,
            "mode": request.mode,
            "contexts": encode_array(request.contexts) if request.contexts is not None else None,
        }
        if request.visual_contexts is not None:
            body["visual_contexts"] = encode_array(request.visual_contexts)
        if request.pixel_prompts is not None:
            body["pixel_prompts"] = encode_array(request.pixel_prompts)
        out = self._call("POST", "/predict", json=body, headers={"Accept": BINARY})
        return out if isinstance(out, np.ndarray) else decode_array(out["scores"])

    def usage(self) -> Usage:
        u = self._call("GET", "/usage")
        return Usage(
            u["used"],
            u["limit"],
            u["images"],
            u.get("work", 0),
            u.get("work_limit"),
            u.get("image_quota"),
            u.get("uploaded", 0),
        )

    def close(self) -> None:
        self._client.close()
