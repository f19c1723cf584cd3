"""``HttpBlackBox``: the ``BlackBoxVLM`` protocol over the HTTP service (``vlmtune serve``)."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np

from vlmtune.blackbox.api import BudgetExceeded, ModelInfo, PredictRequest, Usage
from vlmtune.blackbox.wire import API_PREFIX, decode_array, encode_array, encode_image


class HttpBlackBox:
    """Client of a vlmtune black-box service.

    Args:
        url: service root, e.g. ``http://127.0.0.1:8765``.
        api_key: the key the service issued.
        upload_batch: images per upload request.
    """

    def __init__(self, url: str, api_key: str, timeout: float = 120.0, upload_batch: int = 256) -> None:
        self._client = httpx.Client(
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
        )
        self.upload_batch = upload_batch
        self._info: ModelInfo | None = None

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        r = self._client.request(method, f"{API_PREFIX}{path}", **kwargs)
        if r.status_code == 200:
            return r.json()
        detail = (
            r.json().get("detail", r.text)
            if r.headers.get("content-type", "").startswith("application/json")
            else r.text
        )
        if r.status_code == 429:
            body = r.json()
            raise BudgetExceeded(0, int(body.get("used", 0)), int(body.get("limit") or 0))
        if r.status_code == 404:
            raise KeyError(detail)
        if r.status_code in (400, 413, 422):
            raise ValueError(f"service rejected the request ({r.status_code}): {detail}")
        raise RuntimeError(f"service error {r.status_code}: {detail}")

    def info(self) -> ModelInfo:
        if self._info is None:
            self._info = ModelInfo(**self._call("GET", "/info"))
        return self._info

    def upload(self, images: list[bytes]) -> list[str]:
        ids: list[str] = []
        for start in range(0, len(images), self.upload_batch):
            chunk = [encode_image(b) for b in images[start : start + self.upload_batch]]
            ids += self._call("POST", "/images", json={"images": chunk})["ids"]
        return ids

    def predict(self, request: PredictRequest) -> np.ndarray:
        body: dict[str, Any] = {
            "image_ids": request.image_ids,
            "classnames": request.classnames,
            "template": request.template,
            "mode": request.mode,
            "contexts": encode_array(request.contexts) if request.contexts is not None else None,
        }
        if request.visual_contexts is not None:
            body["visual_contexts"] = encode_array(request.visual_contexts)
        return decode_array(self._call("POST", "/predict", json=body)["scores"])

    def usage(self) -> Usage:
        u = self._call("GET", "/usage")
        return Usage(u["used"], u["limit"], images=u["images"])

    def close(self) -> None:
        self._client.close()
