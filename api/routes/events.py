"""`GET /api/v1/query/{id}/events`: a query's events as Server-Sent Events, resumable by sequence number."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import asyncpg
import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from redis.asyncio import Redis

from api.deps import CurrentUserId, HandlesDep
from api.errors import error_responses
from api.middleware import mark_long_request
from api.routes import V1_PREFIX
from shared.config import Settings
from shared.errors import InvalidInput
from shared.events import Event, EventLog
from shared.limits import Limiter, limiter_for
from shared.metrics import SSE_STREAMS_OPEN
from shared.services import credentials
from shared.services.events import ensure_owner, follow, with_keepalive
from shared.wakeup import Wakeup

router = APIRouter(prefix=f"{V1_PREFIX}/query", tags=["events"])
# A comment line alone, without the blank line that would end an event: some SSE clients (httpx-sse) would
# dispatch an empty event for a bare blank line once they have seen an `id:`.
KEEPALIVE = b": keep-alive\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_frame(event: Event) -> bytes:
    """One event on the wire: `id:` its sequence number, `event:` its type, `data:` its JSON object."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.type.value.encode(), orjson.dumps(event.payload()))


def resume_point(after: int | None, last_event_id: str | None) -> int:
    """Where to start: `Last-Event-ID` (what a reconnecting EventSource sends) wins over `?after`."""
    if last_event_id is not None and last_event_id.strip():
        value = last_event_id.strip()
        if not (value.isascii() and value.isdigit()) or len(value) > 18:
            raise InvalidInput(
                "Last-Event-ID must be an event's sequence number",
                code="invalid_last_event_id",
                details=[{"loc": ["header", "Last-Event-ID"], "msg": "not a sequence number", "type": "invalid"}],
            )
        return int(value)
    return after or 0


@router.get(
    "/{query_id}/events",
    summary="Stream a query's events (Server-Sent Events)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "`id:` seq, `event:` type, `data:` JSON"},
        **error_responses(401, 404, 422, 429, 503),
    },
)
async def stream_events(
    query_id: uuid.UUID,
    request: Request,
    user_id: CurrentUserId,
    handles: HandlesDep,
    after: Annotated[
        int | None, Query(ge=0, le=10**15, description="Resume: only the events numbered above this")
    ] = None,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", description="Resume (wins over `after`)")
    ] = None,
) -> StreamingResponse:
    """The query's events from the start (or after `Last-Event-ID` / `after`) until its terminal event.

    Events: queued, started, delta (`text`), attempt_restarted (drop the text of `previous_attempt`),
    retry_scheduled, completed (usage), failed (code, message), cancelled. `: keep-alive` comments keep idle
    connections open. Another user's query is a 404; too many open streams a 429.
    """
    start = resume_point(after, last_event_id)
    settings, pool, redis = handles.settings, handles.pool, handles.redis
    await ensure_owner(pool, user_id, query_id)
    limiter = limiter_for(redis, settings)
    slot = uuid.uuid4().hex
    lease = _lease_seconds(settings)
    await limiter.take_stream(user_id, slot, lease)
    # A stream's duration is the query's, not latency: keep it out of the latency histogram.
    mark_long_request(request.scope)
    body = _frames(
        settings, handles.events, handles.wakeup, pool, redis, limiter, user_id, query_id, start, slot, lease
    )
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


def _lease_seconds(settings: Settings) -> float:
    # Renewed at every keep-alive: a few missed renewals before a slot lapses.
    return max(30.0, settings.sse_keepalive_seconds * 4)


async def _frames(
    settings: Settings,
    log: EventLog,
    wakeup: Wakeup,
    pool: asyncpg.Pool,
    redis: Redis,
    limiter: Limiter,
    user_id: uuid.UUID,
    query_id: uuid.UUID,
    after: int,
    slot: str,
    lease: float,
) -> AsyncIterator[bytes]:
    SSE_STREAMS_OPEN.inc()
    renewed = checked = time.monotonic()
    interval = settings.sse_keepalive_seconds
    try:
        async for event in with_keepalive(follow(log, wakeup, pool, query_id, after), interval):
            yield KEEPALIVE if event is None else sse_frame(event)
            now = time.monotonic()
            if now - checked >= interval:
                # An account disabled meanwhile ends its open streams (at most one keep-alive interval later);
                # the client's reconnect then hears the 401 `account_disabled`.
                checked = now
                if not await credentials.account_enabled(redis, pool, user_id):
                    return
            if now - renewed >= lease / 4:
                renewed = now
                await limiter.renew_stream(user_id, slot, lease)
    finally:
        SSE_STREAMS_OPEN.dec()
        # The client may be gone and this task cancelled: the slot is still given back.
        with anyio.CancelScope(shield=True):
            await limiter.release_stream(user_id, slot)
