"""The OpenAI-compatible door under `/v1`: the official `openai` SDK works with `base_url=<AIQ>/v1`.

The routes are thin adapters over the same services as the native API (one row per query, one lifecycle,
one set of limits); `router.py` mounts them, `errors.py` renders errors in OpenAI's shape.
"""

from typing import Any

from fastapi import APIRouter

from api.compat.errors import COMPAT_PREFIX

COMPAT_TAG = "OpenAI-compatible"
COMPAT_TAG_METADATA: dict[str, Any] = {
    "name": COMPAT_TAG,
    "description": (
        "OpenAI's protocol under `/v1`: the official `openai` SDK works unchanged with `base_url=<AIQ>/v1` and "
        "an AIQ API key (`aiq_…`) or access token as its `api_key`. The same queries, limits and lifecycle as the "
        "native API (`resp_<hex>` and `chatcmpl-<hex>` are the query `<hex>`). Errors have OpenAI's shape "
        '`{"error": {"message", "type", "param", "code"}}`, and a validation error is a 400, not a 422.'
    ),
}


def compat_router() -> APIRouter:
    """A `/v1` module's router: full paths under `/v1`, listed in AIQ's OpenAPI document under one tag (its
    errors are declared in OpenAI's shape: `api/openapi.py`)."""
    return APIRouter(prefix=COMPAT_PREFIX, tags=[COMPAT_TAG])
