"""The OpenAI-compatible door under `/v1`: the official `openai` SDK works with `base_url=<AIQ>/v1`.

The routes are thin adapters over the same services as the native API (one row per query, one lifecycle,
one set of limits); `router.py` mounts them, `errors.py` renders errors in OpenAI's shape.
"""

from fastapi import APIRouter

from api.compat.errors import COMPAT_PREFIX


def compat_router() -> APIRouter:
    """A `/v1` module's router: full paths under `/v1`, left out of AIQ's own OpenAPI document (OpenAI's published
    API reference is the contract of these routes, and their errors have OpenAI's shape, not AIQ's `ErrorBody`)."""
    return APIRouter(prefix=COMPAT_PREFIX, tags=["openai"], include_in_schema=False)
