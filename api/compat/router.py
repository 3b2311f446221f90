"""The `/v1` router: every OpenAI-compatible route, mounted by `api/main.py`.

Left out of AIQ's own OpenAPI document: OpenAI's published API reference is the contract of these routes,
and their errors have OpenAI's shape, not AIQ's `ErrorBody`.
"""

from __future__ import annotations

from fastapi import APIRouter

from api.compat import batches, chat, files, models, responses
from api.compat.errors import COMPAT_PREFIX

router = APIRouter(prefix=COMPAT_PREFIX, tags=["openai"], include_in_schema=False)
router.include_router(models.router)
router.include_router(responses.router)
router.include_router(chat.router)
router.include_router(files.router)
router.include_router(batches.router)
