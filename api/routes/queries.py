"""Submit, read and list queries."""

from __future__ import annotations

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
from shared.models import QueryStatus
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
    responses=error_responses(400, 401, 409, 413, 415, 422, 429, 503),
)
async def submit(
    body: QueryCreate,
    response: Response,
    caller: SubmitterDep,
    handles: HandlesDep,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="Retry-safe submit: same key and body return the original 202"),
    ] = None,
) -> QueryAccepted:
    """Accept a query; poll the `Location` for the answer."""
    # Each holds a connection only for its database step, never through the publish: a slow broker must
    # not pin database connections. Both have committed when they return, so the publish may follow.
    settings, pool = handles.settings, handles.pool
    limiter, cache = limiter_for(handles.redis, settings), response_cache_for(handles.redis, settings)
    user_id, check = caller.user_id, caller.check
    if idempotency_key is None:
        accepted, limit_headers, _ = await service.submit_query(pool, settings, limiter, cache, user_id, body, check)
        replayed = False
    else:
        accepted, replayed, limit_headers = await service.submit_query_once(
            pool, settings, limiter, cache, user_id, body, idempotency_key, check
        )
    response.headers.update(limit_headers)
    response.headers["Location"] = f"/api/v1/query/{accepted.query_id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
        return accepted
    await service.dispatch_accepted(pool, handles.publisher, handles.events, accepted)
    return accepted


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
