"""Admin endpoints for limits and queries: set a user's limits, requeue a failed query, read any query."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from api.deps import (
    AdminUserId,
    AutocommitSessionDep,
    ConnectionDep,
    HandlesDep,
    SessionDep,
)
from api.errors import error_responses
from api.routes import V1_PREFIX
from shared.limits import limiter_for
from shared.schemas import LimitsIn, LimitsOut, QueryOut
from shared.services import limits as limits_service
from shared.services import queries as queries_service

router = APIRouter(prefix=f"{V1_PREFIX}/admin", tags=["admin"])


@router.put("/users/{user_id}/limits", response_model=LimitsOut, responses=error_responses(401, 403, 404, 422))
async def set_limits(
    user_id: uuid.UUID, body: LimitsIn, admin_id: AdminUserId, session: SessionDep, handles: HandlesDep
) -> LimitsOut:
    """Replace a user's limit overrides (null: the default, 0: no limit). Every API process applies them
    within LIMITS_CACHE_SECONDS."""
    return await limits_service.set_user_limits(session, handles.settings, admin_id, user_id, body)


@router.get("/users/{user_id}/limits", response_model=LimitsOut, responses=error_responses(401, 403, 404, 422))
async def get_limits(
    user_id: uuid.UUID, _admin: AdminUserId, session: AutocommitSessionDep, handles: HandlesDep
) -> LimitsOut:
    """A user's limits in force and their overrides."""
    return await limits_service.get_user_limits(session, handles.settings, user_id)


@router.get("/queries/{query_id}", response_model=QueryOut, responses=error_responses(401, 403, 404, 422))
async def get_any_query(query_id: uuid.UUID, admin_id: AdminUserId, conn: ConnectionDep) -> QueryOut:
    """Any user's query. Each read is logged with the admin's id."""
    return await queries_service.admin_get_query(conn, admin_id, query_id)


@router.post(
    "/queries/{query_id}/requeue", response_model=QueryOut, responses=error_responses(401, 403, 404, 409, 422, 503)
)
async def requeue(
    query_id: uuid.UUID,
    _admin: AdminUserId,
    conn: ConnectionDep,
    handles: HandlesDep,
) -> QueryOut:
    """Send a failed query back to pending for one more attempt (its attempt count is kept)."""
    settings = handles.settings
    limiter = limiter_for(handles.redis, settings)
    query = await queries_service.requeue_query(conn, settings, limiter, query_id, events=handles.events)
    # A failed publish leaves the row pending for the sweeper, as on submit.
    await handles.publisher.publish(query_id)
    return query
