"""The JSON wire format shared by the HTTP service and its client (arrays as base64 little-endian float32)."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np

API_PREFIX = "/v1"
MAX_ARRAY_BYTES = 64 * 2**20  # JSON arrays (base64); larger replies travel as raw float32 (BINARY)
BINARY = "application/octet-stream"


def encode_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}


def decode_array(obj: dict[str, Any]) -> np.ndarray:
    """Decode and check an array object; any inconsistency raises ``ValueError``."""
    if not isinstance(obj, dict) or obj.get("dtype") != "float32":
        raise ValueError("arrays must be objects with dtype 'float32', shape and base64 data")
    shape = obj.get("shape")
    if not isinstance(shape, list) or len(shape) > 5 or not all(_is_dim(d) for d in shape):
        raise ValueError(f"array shape must be a list of at most 5 ints in [0, {MAX_ARRAY_BYTES}]")
    expected = 4 * math.prod(shape)  # exact: no integer overflow; () is a scalar of one value
    if expected > MAX_ARRAY_BYTES:
        raise ValueError(f"an array of shape {shape} is over the {MAX_ARRAY_BYTES}-byte limit")
    try:
        raw = base64.b64decode(obj.get("data", ""), validate=True)
    except (ValueError, TypeError):
        raise ValueError("array data is not valid base64") from None
    if len(raw) != expected:
        raise ValueError(f"array data has {len(raw)} bytes, shape {shape} needs {expected}")
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)


def _is_dim(d: object) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_ARRAY_BYTES


def encode_image(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode_image(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"image is not valid base64: {exc}") from exc


def decode_binary(data: bytes, shape_header: str) -> np.ndarray:
    """A raw little-endian float32 reply with its ``X-Shape`` header ("C,N,K") -> array; checks the byte count."""
    try:
        shape = [int(d) for d in shape_header.split(",")]
    except ValueError:
        raise ValueError(f"bad X-Shape header {shape_header[:40]!r}") from None
    if any(d < 0 for d in shape) or len(data) != 4 * math.prod(shape):
        raise ValueError(f"reply has {len(data)} bytes, not those of shape {shape_header[:40]}")
    return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)
