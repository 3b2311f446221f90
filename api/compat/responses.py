"""`/v1/responses`: background and foreground Responses over the query queue."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from api.compat.submit import refuse_stream, submit, wait
from api.deps import ConnectionDep, CurrentUserId, PoolDep, PublisherDep, RedisDep, SettingsDep
from shared.errors import Conflict
from shared.limits import limiter_for
from shared.schemas_openai import ResponseCreate
from shared.services import queries as queries_service
from shared.services import responses as service

router = APIRouter()
# A cancel of a running query is carried out by its worker; wait this long for it to say so.
CANCEL_WAIT_SECONDS = 5.0


@router.post("/responses")
async def create_response(
    body: ResponseCreate,
    request: Request,
    response: Response,
    user_id: CurrentUserId,
    settings: SettingsDep,
    pool: PoolDep,
    publisher: PublisherDep,
    redis: RedisDep,
) -> dict[str, Any]:
    """`background: true` answers `queued` at once; otherwise the answer, once the queue has it."""
    refuse_stream(body.stream)
    accepted = await submit(pool, settings, redis, publisher, user_id, service.query_from_response(body), response)
    if body.background:
        query = await queries_service.wait_for_query(pool, user_id, accepted.query_id)
    else:
        query = await wait(request, pool, settings, user_id, accepted.query_id)
    return service.response_object(query, background=bool(body.background))


@router.get("/responses/{response_id}")
async def get_response(response_id: str, user_id: CurrentUserId, conn: ConnectionDep) -> dict[str, Any]:
    """The response as it stands; another user's is a 404 like a missing one."""
    query_id = service.parse_id(response_id, service.RESPONSE_PREFIX, "response")
    return service.response_object(await queries_service.get_query(conn, user_id, query_id))


@router.post("/responses/{response_id}/cancel")
async def cancel_response(
    response_id: str, user_id: CurrentUserId, pool: PoolDep, redis: RedisDep, settings: SettingsDep
) -> dict[str, Any]:
    """Cancel; idempotent: a finished response (cancelled or not) is returned as it is."""
    query_id = service.parse_id(response_id, service.RESPONSE_PREFIX, "response")
    try:
        async with pool.acquire() as conn:
            await queries_service.cancel_query(conn, limiter_for(redis, settings), user_id, query_id)
    except Conflict as exc:
        if exc.code != "query_not_cancellable":
            raise
    # A running query ends cancelled once its worker notices (within a heartbeat): answer with that.
    return service.response_object(await queries_service.wait_for_query(pool, user_id, query_id, CANCEL_WAIT_SECONDS))


@router.delete("/responses/{response_id}")
async def delete_response(
    response_id: str, user_id: CurrentUserId, conn: ConnectionDep, redis: RedisDep, settings: SettingsDep
) -> dict[str, Any]:
    """Erase the response's text (the native delete: a running one is a 409, cancel it first)."""
    query_id = service.parse_id(response_id, service.RESPONSE_PREFIX, "response")
    await queries_service.delete_query(conn, limiter_for(redis, settings), user_id, query_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}
