"""Submitting and waiting for a query from the `/v1` door: the native submit service, then the publish."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request, Response

from api.deps import Handles, Submitter
from api.middleware import mark_long_request
from shared.cache import response_cache_for
from shared.errors import InvalidInput
from shared.limits import limiter_for
from shared.schemas import QueryAccepted, QueryCreate, QueryOut
from shared.services import queries as service
from shared.services import responses as responses_service
from shared.services.credentials import DeferredCheck


async def submit(
    handles: Handles,
    user_id: uuid.UUID,
    body: QueryCreate,
    response: Response,
    params: dict[str, str],
    background: bool = False,
    check: DeferredCheck | None = None,
) -> QueryOut:
    """Store a pending query under the caller's limits (the `RateLimit` headers go on `response`), then publish
    it, as the native submit does; `background` is a Responses create's, kept on the row. A refusal's `param`
    names the request's own field (`params`: `CHAT_PARAMS` or `RESPONSE_PARAMS`). `check`: the caller's
    revocation state, read with the limits (`SubmitterDep`).

    Returns the query as stored (pending, or completed from the cache), not read back: a worker may have
    claimed it since, which the next read shows."""
    accepted, row = await _store(handles, user_id, body, response, params, background, check)
    await _publish(handles, accepted)
    return service.stored_view(row)


async def _store(
    handles: Handles,
    user_id: uuid.UUID,
    body: QueryCreate,
    response: Response,
    params: dict[str, str],
    background: bool,
    check: DeferredCheck | None,
) -> tuple[QueryAccepted, dict[str, Any]]:
    """The query stored under the caller's limits (not yet published): the 202 body and its row."""
    settings, redis = handles.settings, handles.redis
    limiter, cache = limiter_for(redis, settings), response_cache_for(redis, settings)
    try:
        accepted, limit_headers, row = await service.submit_query(
            handles.pool, settings, limiter, cache, user_id, body, check, background=background
        )
    except InvalidInput as exc:
        raise responses_service.name_params(exc, params) from None
    response.headers.update(limit_headers)
    return accepted, row


async def _publish(handles: Handles, accepted: QueryAccepted) -> None:
    await service.dispatch_accepted(handles.pool, handles.publisher, handles.events, accepted)


async def submit_and_wait(
    request: Request,
    handles: Handles,
    caller: Submitter,
    body: QueryCreate,
    response: Response,
    params: dict[str, str],
) -> QueryOut:
    """`submit`, then the query once it is terminal, or as it stands after COMPAT_WAIT_SECONDS (the native
    long-poll's wait). The wait watches the query before its publish, so it costs one read: after the end (none
    for a cache hit, stored completed)."""
    mark_long_request(request.scope)
    accepted, row = await _store(handles, caller.user_id, body, response, params, False, caller.check)
    wait_s = handles.settings.compat_wait_seconds
    return await service.dispatch_and_wait(
        handles.pool, handles.publisher, handles.events, handles.wakeup, accepted, row, wait_s
    )
