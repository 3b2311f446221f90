"""`/v1/responses`: background, foreground and streamed Responses over the query queue."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Request, Response
from fastapi.responses import StreamingResponse

from api.compat import compat_router
from api.compat.errors import openai_error_responses
from api.compat.streaming import StreamContextDep, event_stream_response, submitter_stream_context
from api.compat.submit import submit, submit_and_wait
from api.deps import ConnectionDep, CurrentUserId, HandlesDep, ScopedPrincipal, SubmitterDep
from shared.errors import Conflict
from shared.limits import limiter_for
from shared.schemas_openai import (
    RESPONSE_EVENT_TYPE,
    ResponseCreate,
    ResponseDeleted,
    ResponseObject,
    ResponseStreamEvent,
)
from shared.services import queries as queries_service
from shared.services import responses as service

router = compat_router()
# A cancel of a running query is carried out by its worker; wait this long for it to say so.
CANCEL_WAIT_SECONDS = 5.0
# The `event:` name of a Responses stream's events: their `type`.
_RESPONSE_EVENT = {"type": "string", "pattern": RESPONSE_EVENT_TYPE, "description": "The event's `type`"}


@router.post(
    "/responses",
    response_model=None,
    responses={
        200: event_stream_response(
            ResponseObject,
            "`stream: true`: the Responses events, each with its `sequence_number`",
            "The event as JSON: its `type` (the `event:` name), `sequence_number` and the type's own fields",
            _RESPONSE_EVENT,
            (ResponseStreamEvent,),
        ),
        **openai_error_responses(429),
    },
)
async def create_response(
    body: ResponseCreate,
    request: Request,
    response: Response,
    caller: SubmitterDep,
    handles: HandlesDep,
) -> dict[str, Any] | StreamingResponse:
    """Create a response: queued at once (`background: true`), streamed (`stream: true`), or waited for.

    `background: true` answers `queued` at once; `stream: true` streams its events; otherwise the call waits
    for the answer."""
    user_id = caller.user_id
    query = service.query_from_response(body)
    background = bool(body.background)
    if body.stream:
        streams = await submitter_stream_context(handles, caller)
        upkeep = await streams.reserve()
        try:
            created = await submit(handles, user_id, query, response, service.RESPONSE_PARAMS, background)
            translator = service.ResponseEvents(created)
            return streams.respond(request, created.query_id, translator, upkeep, chat=False)
        except BaseException:
            await upkeep.release()
            raise
    if not background:
        answered = await submit_and_wait(request, handles, caller, query, response, service.RESPONSE_PARAMS)
        return service.response_object(answered)
    # The response as created (queued, or completed from the cache): a worker may have claimed it already,
    # which the next retrieve shows.
    created = await submit(handles, user_id, query, response, service.RESPONSE_PARAMS, background, caller.check)
    return service.response_object(created)


@router.get(
    "/responses/{response_id}",
    response_model=None,
    responses={
        200: event_stream_response(
            ResponseObject,
            "`stream=true`: the Responses events from the start, or after `starting_after`",
            "The event as JSON: its `type` (the `event:` name), `sequence_number` and the type's own fields",
            _RESPONSE_EVENT,
            (ResponseStreamEvent,),
        ),
        **openai_error_responses(404, 429),
    },
)
async def get_response(
    response_id: str,
    request: Request,
    principal: ScopedPrincipal,
    conn: ConnectionDep,
    streams: StreamContextDep,
    stream: bool = False,
    starting_after: Annotated[int, Query(ge=-1, le=10**15)] = -1,
) -> dict[str, Any] | StreamingResponse:
    """Retrieve a response, or stream its events (`stream=true`, resumable after `starting_after`).

    The response as it stands; with `stream=true` its events (from the start, or after `starting_after`).
    Another user's is a 404 like a missing one."""
    query_id = service.parse_id(response_id, service.RESPONSE_PREFIX, "response")
    current = await queries_service.get_query(conn, principal.user_id, query_id)
    if not stream:
        return service.response_object(current)
    translator = service.ResponseEvents(current)
    # Nothing that can fail between the take and the return: the response gives the slot back from then on.
    upkeep = await streams.reserve()
    return streams.respond(request, query_id, translator, upkeep, starting_after=starting_after, chat=False)


@router.post(
    "/responses/{response_id}/cancel",
    responses={
        200: {"model": ResponseObject, "description": "The response as it stands"},
        **openai_error_responses(404, 409),
    },
)
async def cancel_response(
    response_id: str,
    user_id: CurrentUserId,
    handles: HandlesDep,
) -> dict[str, Any]:
    """Cancel a response; idempotent: a finished one (cancelled or not) is returned as it is.

    A query changing state at that moment is a 409 (`query_busy`): try again."""
    query_id = service.parse_id(response_id, service.RESPONSE_PREFIX, "response")
    try:
        async with handles.pool.acquire() as conn:
            limiter = limiter_for(handles.redis, handles.settings)
            # Ended here, not by a worker: its webhooks are sent now, as the native cancel's are.
            await queries_service.cancel_query(
                conn, limiter, user_id, query_id, events=handles.events, publisher=handles.publisher
            )
    except Conflict as exc:
        if exc.code != "query_not_cancellable":
            raise
    # A running query ends cancelled once its worker notices (within a heartbeat): answer with that.
    return service.response_object(
        await queries_service.wait_for_query(handles.pool, user_id, query_id, CANCEL_WAIT_SECONDS, handles.wakeup)
    )


@router.delete(
    "/responses/{response_id}",
    responses={200: {"model": ResponseDeleted, "description": "Deleted"}, **openai_error_responses(404, 409)},
)
async def delete_response(
    response_id: str,
    user_id: CurrentUserId,
    conn: ConnectionDep,
    handles: HandlesDep,
) -> dict[str, Any]:
    """Delete a response's text (the native delete: a running one is a 409, cancel it first)."""
    query_id = service.parse_id(response_id, service.RESPONSE_PREFIX, "response")
    limiter = limiter_for(handles.redis, handles.settings)
    await queries_service.delete_query(
        conn, limiter, user_id, query_id, events=handles.events, publisher=handles.publisher
    )
    return {"id": response_id, "object": "response.deleted", "deleted": True}
