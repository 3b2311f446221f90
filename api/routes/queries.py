"""Submit, read and list queries."""

from __future__ import annotations

import math
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import JSONResponse

from api.deps import AutocommitSessionDep, ConnectionDep, CurrentUserId, HandlesDep, SubmitterDep
from api.errors import error_responses
from api.middleware import mark_long_request
from api.routes import V1_PREFIX
from shared.cache import response_cache_for
from shared.limits import limiter_for
from shared.models import TERMINAL_STATUSES, QueryStatus
from shared.schemas import QueryAccepted, QueryCreate, QueryOut, QueryPage
from shared.services import queries as service

router = APIRouter(prefix=f"{V1_PREFIX}/query", tags=["queries"])
# Long-polls end within this, well inside common proxy and load balancer idle timeouts (60 s).
MAX_WAIT_SECONDS = 30.0


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=QueryAccepted,
    summary="Submit a query",
    responses={
        200: {
            "model": QueryOut,
            "description": "With `Prefer: wait=N`: the query ended within the wait (its answer, as a long-poll's)",
        },
        **error_responses(400, 401, 409, 413, 415, 422, 429, 503),
    },
)
async def submit(
    body: QueryCreate,
    request: Request,
    response: Response,
    caller: SubmitterDep,
    handles: HandlesDep,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="Retry-safe submit: same key and body return the original 202"),
    ] = None,
    prefer: Annotated[
        str | None,
        Header(
            alias="Prefer",
            description=(
                "`wait=N` (RFC 7240, N ≤ 30 seconds): answer 200 with the finished query if it ends within N "
                "seconds, else the usual 202 once they have passed. Anything else is ignored."
            ),
        ),
    ] = None,
) -> QueryAccepted | JSONResponse:
    """Accept a query; poll the `Location` for the answer, or ask to wait for it with `Prefer: wait=N`."""
    # Each holds a connection only for its database step, never through the publish: a slow broker must
    # not pin database connections. Both have committed when they return, so the publish may follow.
    settings, pool = handles.settings, handles.pool
    limiter, cache = limiter_for(handles.redis, settings), response_cache_for(handles.redis, settings)
    user_id, check = caller.user_id, caller.check
    wait = wait_preference(prefer)
    replayed = False
    if idempotency_key is None:
        accepted, limit_headers, row = await service.submit_query(pool, settings, limiter, cache, user_id, body, check)
    else:
        accepted, replayed, limit_headers = await service.submit_query_once(
            pool, settings, limiter, cache, user_id, body, idempotency_key, check
        )
    response.headers.update(limit_headers)
    response.headers["Location"] = f"/api/v1/query/{accepted.query_id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if wait is not None:
        # Its duration is the client's chosen wait, not latency: keep it out of the latency histogram.
        mark_long_request(request.scope)
        response.headers["Preference-Applied"] = f"wait={wait:g}"
    if wait is not None and idempotency_key is None:
        # Watched from before its publish: the wait costs one read, after the end.
        query = await service.dispatch_and_wait(
            pool, handles.publisher, handles.events, handles.wakeup, accepted, row, wait
        )
    else:
        if not replayed:
            await service.dispatch_accepted(pool, handles.publisher, handles.events, accepted)
        if wait is None:
            return accepted
        # A keyed submit may be a retry of one that has ended: its wait reads first.
        query = await service.wait_for_query(pool, user_id, accepted.query_id, wait, handles.wakeup)
    if query.status not in TERMINAL_STATUSES:
        # Still going: the usual 202, with the status the wait last saw.
        return accepted.model_copy(update={"status": query.status})
    return JSONResponse(query.model_dump(mode="json"), status_code=status.HTTP_200_OK, headers=response.headers)


def wait_preference(prefer: str | None) -> float | None:
    """The seconds of a `Prefer` header's `wait` preference (RFC 7240 §4.3), at most MAX_WAIT_SECONDS; None when
    there is none, or it is malformed, or `respond-async` is asked for too (a preference a server may not
    honour is ignored, not refused)."""
    if not prefer:
        return None
    wait: float | None = None
    for preference in prefer.split(","):
        token, _, value = preference.split(";", 1)[0].partition("=")
        name = token.strip().lower()
        if name == "respond-async":
            return None
        if name == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                continue
            if math.isfinite(seconds) and seconds > 0:
                wait = min(seconds, MAX_WAIT_SECONDS)
    return wait


@router.get(
    "/{query_id}",
    response_model=QueryOut,
    summary="Get a query (optionally long-poll for its answer)",
    responses=error_responses(401, 404, 422, 503),
)
async def get(
    query_id: uuid.UUID,
    request: Request,
    user_id: CurrentUserId,
    handles: HandlesDep,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT_SECONDS,
            description="Long-poll: answer as soon as the query is terminal, or after this many seconds",
        ),
    ] = 0,
) -> QueryOut:
    """One of the caller's queries; anybody else's is a 404. With `wait`, a long-poll."""
    if wait:
        # Its duration is the client's chosen wait, not latency: keep it out of the latency histogram.
        mark_long_request(request.scope)
    return await service.wait_for_query(handles.pool, user_id, query_id, wait, handles.wakeup)


@router.post(
    "/{query_id}/cancel",
    response_model=QueryOut,
    summary="Cancel a query",
    responses={
        202: {"model": QueryOut, "description": "Running: the worker is stopping the call"},
        **error_responses(401, 404, 409, 422, 503),
    },
)
async def cancel(
    query_id: uuid.UUID,
    user_id: CurrentUserId,
    conn: ConnectionDep,
    handles: HandlesDep,
) -> JSONResponse:
    """Cancel: a pending query ends at once (200); a running one stops shortly (202); a finished one is 409."""
    limiter = limiter_for(handles.redis, handles.settings)
    query = await service.cancel_query(
        conn, limiter, user_id, query_id, events=handles.events, publisher=handles.publisher
    )
    code = status.HTTP_200_OK if query["status"] == QueryStatus.CANCELLED else status.HTTP_202_ACCEPTED
    return JSONResponse(service.to_out(query).model_dump(mode="json"), status_code=code)


@router.delete(
    "/{query_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a query's text",
    responses=error_responses(401, 404, 409, 422, 503),
)
async def delete(
    query_id: uuid.UUID,
    user_id: CurrentUserId,
    conn: ConnectionDep,
    handles: HandlesDep,
) -> Response:
    """Erase a query's prompt, system prompt, answer and metadata (its usage stays counted); afterwards it
    is a 404. A pending query is cancelled first; a running one is a 409 (`query_running`): cancel it first."""
    limiter = limiter_for(handles.redis, handles.settings)
    await service.delete_query(conn, limiter, user_id, query_id, events=handles.events, publisher=handles.publisher)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("", response_model=QueryPage, summary="List your queries", responses=error_responses(401, 422, 503))
async def list_(
    user_id: CurrentUserId,
    session: AutocommitSessionDep,
    status_: Annotated[QueryStatus | None, Query(alias="status")] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> QueryPage:
    """The caller's queries, newest first."""
    return await service.list_queries(session, user_id, status=status_, cursor=cursor, limit=limit)
