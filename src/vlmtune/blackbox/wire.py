"""The JSON wire format shared by the HTTP service and its client (arrays as base64 little-endian float32)."""

from __future__ import annotations

import base64
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
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or len(shape) > 5:
        raise ValueError("array shape must be a list of at most 5 non-negative ints")
    try:
        raw = base64.b64decode(obj.get("data", ""), validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"array data is not valid base64: {exc}") from exc
    expected = 4 * int(np.prod(shape)) if shape else 4
    if len(raw) != expected or len(raw) > MAX_ARRAY_BYTES:
        raise ValueError(f"array data has {len(raw)} bytes, shape {shape} needs {expected}")
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)


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
        raise ValueError(f"bad X-Shape header {shape_header!r}") from None
    if len(data) != 4 * int(np.prod(shape)):
        raise ValueError(f"reply has {len(data)} bytes, shape {shape} needs {4 * int(np.prod(shape))}")
    return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)
