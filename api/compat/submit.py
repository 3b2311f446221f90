"""Submitting and waiting for a query from the `/v1` door: the native submit service, then the publish."""

from __future__ import annotations

import uuid

from fastapi import Request, Response

from api.deps import Handles
from api.middleware import mark_long_request
from shared.cache import response_cache_for
from shared.errors import InvalidInput
from shared.limits import limiter_for
from shared.schemas import QueryAccepted, QueryCreate, QueryOut
from shared.services import queries as service
from shared.services import responses as responses_service


async def submit(
    handles: Handles,
    user_id: uuid.UUID,
    body: QueryCreate,
    response: Response,
    params: dict[str, str],
    background: bool = False,
) -> QueryAccepted:
    """Store a pending query under the caller's limits (the `RateLimit` headers go on `response`), then publish
    it, as the native submit does; `background` is a Responses create's, kept on the row. A refusal's `param`
    names the request's own field (`params`: `CHAT_PARAMS` or `RESPONSE_PARAMS`)."""
    settings, pool, redis = handles.settings, handles.pool, handles.redis
    limiter, cache = limiter_for(redis, settings), response_cache_for(redis, settings)
    try:
        accepted, limit_headers = await service.submit_query(
            pool, settings, limiter, cache, user_id, body, background=background
        )
    except InvalidInput as exc:
        raise responses_service.name_params(exc, params) from None
    response.headers.update(limit_headers)
    await service.dispatch_accepted(pool, handles.publisher, handles.events, accepted)
    return accepted


async def wait(request: Request, handles: Handles, user_id: uuid.UUID, query_id: uuid.UUID) -> QueryOut:
    """The query once it is terminal, or as it stands after COMPAT_WAIT_SECONDS (the native long-poll's wait)."""
    mark_long_request(request.scope)
    wait_s = handles.settings.compat_wait_seconds
    return await service.wait_for_query(handles.pool, user_id, query_id, wait_s, handles.wakeup)
