"""JSON encoding for the hot path: orjson when installed, the standard library otherwise."""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is optional
    orjson = None  # type: ignore[assignment]


def dumps(obj: Any) -> bytes:
    """Serialize `obj` to compact UTF-8 JSON bytes."""
    if orjson is not None:
        return orjson.dumps(obj)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def loads(data: bytes) -> Any:
    """Parse JSON bytes; raises `ValueError` on malformed input or bad UTF-8."""
    if orjson is not None:
        return orjson.loads(data)
    return json.loads(data)
