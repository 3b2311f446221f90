"""Server-Sent Events of the `/v1` door, on top of the query's event log (`shared/services/events.follow`).

Responses streams carry `event: <type>` and a `sequence_number` in every event; a stream is told from the
start of the log each time, so the same log always gives the same numbers and
`GET /v1/responses/{id}?stream=true&starting_after=N` resumes exactly after event N. Chat completion streams
are `data:` chunks closed by `data: [DONE]`. Open streams count against the user's stream cap like the
native `/api/v1/query/{id}/events` and, like it, end once the credential they were opened with is no longer
valid (`StreamUpkeep`: re-checked once per keep-alive interval).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Annotated, Any, Protocol

import asyncpg
import orjson
from fastapi import Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from redis.asyncio import Redis

from api.deps import Handles, HandlesDep, ScopedPrincipal, Submitter
from api.middleware import mark_long_request
from api.openapi import component_ref, sse_event_schema
from api.routes.events import KEEPALIVE, EventStreamResponse, StreamUpkeep
from shared.config import Settings
from shared.events import EventLog
from shared.limits import Limiter, limiter_for
from shared.models import TERMINAL_STATUSES
from shared.schemas import QueryOut
from shared.services import queries as queries_service
from shared.services.credentials import Principal
from shared.services.events import follow, with_keepalive
from shared.wakeup import Wakeup

# The row is written before its terminal event is told; this covers a reader that is faster than that.
FINAL_READ_WAIT_SECONDS = 5.0


def event_stream_response(
    model: type[BaseModel],
    description: str,
    data: str,
    event: dict[str, Any],
    data_models: tuple[type[BaseModel], ...] = (),
    last_data: str | None = None,
) -> dict[str, Any]:
    """The OpenAPI 200 of a route that answers JSON (`model`), or Server-Sent Events when asked to stream (one
    event: `data` what its `data:` holds, `data_models` the models of its JSON where they are known, `last_data`
    the closing event's text, `event` its `event:` name's schema)."""
    refs = [component_ref(model) for model in data_models]
    data_schema = (refs[0] if len(refs) == 1 else {"anyOf": refs}) if refs else None
    event_schema = sse_event_schema(data, event, data_schema=data_schema, last_data=last_data)
    return {
        "model": model,
        "description": f"The `{model.__name__}` as JSON; {description} (`text/event-stream`)",
        "content": {"text/event-stream": {"schema": event_schema}},
    }


class Translator(Protocol):
    def start(self) -> list[dict[str, Any]]: ...
    def event(self, type_: str, data: dict[str, Any]) -> list[dict[str, Any]]: ...
    def finish(self, query: QueryOut) -> list[dict[str, Any]]: ...


class StreamContext:
    """What a stream needs from the request: its handles and the caller (re-checked while the stream runs)."""

    def __init__(
        self,
        settings: Settings,
        log: EventLog,
        wakeup: Wakeup,
        pool: asyncpg.Pool,
        redis: Redis,
        limiter: Limiter,
        principal: Principal,
    ) -> None:
        self.settings, self.log, self.wakeup, self.pool, self.redis = settings, log, wakeup, pool, redis
        self.limiter, self.principal, self.user_id = limiter, principal, principal.user_id

    async def reserve(self) -> StreamUpkeep:
        """Take one of the caller's stream slots (a 429 when they are all open), before anything is stored.

        Until `respond` has returned, the caller gives it back (`upkeep.release()`) if anything fails."""
        upkeep = StreamUpkeep(self.settings, self.redis, self.pool, self.limiter, self.principal, uuid.uuid4().hex)
        await self.limiter.take_stream(self.user_id, upkeep.slot, upkeep.lease)
        return upkeep

    def respond(
        self,
        request: Request,
        query_id: uuid.UUID,
        translator: Translator,
        upkeep: StreamUpkeep,
        *,
        starting_after: int = -1,
        chat: bool,
    ) -> StreamingResponse:
        """The stream on a reserved slot; the slot is given back when the response ends, however it ends."""
        mark_long_request(request.scope)
        return EventStreamResponse(self._frames(query_id, translator, starting_after, chat, upkeep), upkeep)

    async def _final(self, query_id: uuid.UUID) -> QueryOut:
        return await queries_service.wait_for_query(
            self.pool, self.user_id, query_id, FINAL_READ_WAIT_SECONDS, self.wakeup
        )

    async def _objects(self, query_id: uuid.UUID, translator: Translator) -> AsyncGenerator[dict[str, Any] | None]:
        for obj in translator.start():
            yield obj
        events = follow(self.log, self.wakeup, self.pool, query_id, 0)
        async for event in with_keepalive(events, self.settings.sse_keepalive_seconds):
            if event is None:
                yield None
            elif event.terminal:
                for obj in translator.finish(await self._final(query_id)):
                    yield obj
                return
            else:
                for obj in translator.event(event.type.value, event.data):
                    yield obj
        # The log ended without a terminal event (the query's row is gone or not finished): tell what stands.
        query = await self._final(query_id)
        if query.status in TERMINAL_STATUSES:
            for obj in translator.finish(query):
                yield obj

    async def _frames(
        self, query_id: uuid.UUID, translator: Translator, starting_after: int, chat: bool, upkeep: StreamUpkeep
    ) -> AsyncGenerator[bytes]:
        number = -1
        objects = self._objects(query_id, translator)
        async with upkeep, aclosing(objects):
            async for obj in objects:
                if obj is None:
                    yield KEEPALIVE
                elif chat:
                    yield b"data: " + orjson.dumps(obj) + b"\n\n"
                else:
                    number += 1
                    if number > starting_after:
                        yield b"event: %s\ndata: %s\n\n" % (
                            obj["type"].encode(),
                            orjson.dumps({**obj, "sequence_number": number}),
                        )
                # A credential no longer valid ends the stream as a log that ends early does: nothing more is told
                # (a chat stream still gets its `[DONE]`).
                if not await upkeep.keep():
                    break
            if chat:
                yield b"data: [DONE]\n\n"


def _stream_context(handles: Handles, principal: Principal) -> StreamContext:
    settings, redis = handles.settings, handles.redis
    return StreamContext(
        settings, handles.events, handles.wakeup, handles.pool, redis, limiter_for(redis, settings), principal
    )


async def stream_context(handles: HandlesDep, principal: ScopedPrincipal) -> StreamContext:
    return _stream_context(handles, principal)


async def submitter_stream_context(handles: Handles, caller: Submitter) -> StreamContext:
    """A create's stream, for a caller whose revocation state was left to the submit (`SubmitterDep`): read now,
    before the stream's slot is taken."""
    if caller.check is not None:
        await caller.check.run()
    return _stream_context(handles, caller.principal)


StreamContextDep = Annotated[StreamContext, Depends(stream_context)]
