"""`GET /api/v1/query/{id}/events`: a query's events as Server-Sent Events, resumable by sequence number."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from types import TracebackType
from typing import Annotated

import anyio
import asyncpg
import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from redis.asyncio import Redis
from starlette.types import Receive, Scope, Send

from api.deps import HandlesDep, ScopedPrincipal
from api.errors import error_responses
from api.middleware import mark_long_request
from api.openapi import sse_event_schema
from api.routes import V1_PREFIX
from shared.config import Settings
from shared.errors import InvalidInput
from shared.events import Event, EventLog, EventType
from shared.limits import Limiter, limiter_for
from shared.metrics import SSE_STREAMS_OPEN
from shared.services import credentials
from shared.services.credentials import Principal
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
        200: {
            "description": "`id:` the event's sequence number, `event:` its type, `data:` its JSON object",
            "content": {
                "text/event-stream": {
                    "schema": sse_event_schema(
                        "The event as a JSON object: `seq`, `type`, `attempt` and the type's own fields",
                        {"type": "string", "enum": [t.value for t in EventType]},
                        with_id=True,
                    )
                }
            },
        },
        **error_responses(401, 404, 422, 429, 503),
    },
)
async def stream_events(
    query_id: uuid.UUID,
    request: Request,
    principal: ScopedPrincipal,
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
    connections open. Another user's query is a 404; too many open streams a 429. The stream ends without a
    terminal event once its credential is no longer valid (checked once per keep-alive interval); the reconnect
    hears the 401.
    """
    start = resume_point(after, last_event_id)
    settings, pool, redis = handles.settings, handles.pool, handles.redis
    user_id = principal.user_id
    await ensure_owner(pool, user_id, query_id)
    limiter = limiter_for(redis, settings)
    upkeep = StreamUpkeep(settings, redis, pool, limiter, principal, uuid.uuid4().hex)
    # Built before the slot is taken, so that nothing between the take and the return can fail and leave it taken
    # (a 429 drops a body that never started: nothing to undo).
    response = EventStreamResponse(_frames(upkeep, handles.events, handles.wakeup, pool, query_id, start), upkeep)
    await limiter.take_stream(user_id, upkeep.slot, upkeep.lease)
    # A stream's duration is the query's, not latency: keep it out of the latency histogram.
    mark_long_request(request.scope)
    return response


class StreamUpkeep:
    """What an open stream does besides its events, the same for this route and the `/v1` door's streams: it
    renews its slot's lease (taken with `lease`), re-checks the credential it was opened with once per keep-alive
    interval, and gives the slot back when it ends (`async with`, which also counts it in `aiq_sse_streams_open`).

    An access token's stream runs until the token expires, then ends like a revoked one: the client reconnects with
    a fresh token and resumes where it was (`Last-Event-ID`, `starting_after`)."""

    def __init__(
        self, settings: Settings, redis: Redis, pool: asyncpg.Pool, limiter: Limiter, principal: Principal, slot: str
    ) -> None:
        # Renewed every lease/4: a few missed renewals before a slot lapses.
        self.lease = max(30.0, settings.sse_keepalive_seconds * 4)
        self.interval = settings.sse_keepalive_seconds
        self._redis, self._pool, self._limiter = redis, pool, limiter
        self._principal, self.slot = principal, slot
        self._renewed = self._checked = time.monotonic()
        self._released = False

    async def keep(self) -> bool:
        """Run after each frame: False when the stream must end now (its credential is no longer valid)."""
        now = time.monotonic()
        if now - self._renewed >= self.lease / 4:
            self._renewed = now
            await self._limiter.renew_stream(self._principal.user_id, self.slot, self.lease)
        if now - self._checked < self.interval:
            return True
        self._checked = now
        return await credentials.still_valid(self._redis, self._pool, self._principal)

    async def release(self) -> None:
        """Give the slot back (once: a later call does nothing); the client may be gone and this task cancelled,
        so it is shielded."""
        if self._released:
            return
        self._released = True
        with anyio.CancelScope(shield=True):
            await self._limiter.release_stream(self._principal.user_id, self.slot)

    async def __aenter__(self) -> StreamUpkeep:
        SSE_STREAMS_OPEN.inc()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        SSE_STREAMS_OPEN.dec()
        await self.release()


class EventStreamResponse(StreamingResponse):
    """An event stream on a slot of the stream cap (`StreamUpkeep`), for this route and the `/v1` door's streams:
    the slot is given back once the response ends, however it ends.

    The body (an async generator entered with `async with upkeep`) gives it back itself when it ends or is
    cancelled while it runs. A body that never starts runs no `finally` at all: a client gone before it (the server's
    `send` raising at the response start, ASGI 2.4; a `send` that waits and is cancelled before the first chunk)
    would hold the slot until its lease lapsed and a quick reconnect would hear 429s. So the response closes its
    body and gives the slot back after the parent's `__call__`, whatever it did: one release in every case."""

    def __init__(self, body: AsyncGenerator[bytes], upkeep: StreamUpkeep) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self._body, self._upkeep = body, upkeep

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    # A body cancelled at a `yield` (its `send` waiting) ends now, not when it is collected: its
                    # `finally` gives the slot back and leaves the open-streams gauge.
                    await self._body.aclose()
                finally:
                    await self._upkeep.release()


async def _frames(
    upkeep: StreamUpkeep, log: EventLog, wakeup: Wakeup, pool: asyncpg.Pool, query_id: uuid.UUID, after: int
) -> AsyncGenerator[bytes]:
    events = with_keepalive(follow(log, wakeup, pool, query_id, after), upkeep.interval)
    async with upkeep, aclosing(events):
        async for event in events:
            yield KEEPALIVE if event is None else sse_frame(event)
            if not await upkeep.keep():
                return
