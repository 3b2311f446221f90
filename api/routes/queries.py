"""Submit, read and list queries."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from api.deps import CurrentUserId, PublisherDep, SessionDep, SettingsDep
from shared.metrics import QUERIES_SUBMITTED
from shared.models import QueryStatus
from shared.schemas import QueryAccepted, QueryCreate, QueryOut, QueryPage
from shared.services import queries as service

router = APIRouter(prefix="/query", tags=["queries"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=QueryAccepted)
async def submit(
    body: QueryCreate,
    response: Response,
    user_id: CurrentUserId,
    session: SessionDep,
    settings: SettingsDep,
    publisher: PublisherDep,
) -> QueryAccepted:
    """Accept a query; poll the `Location` for the answer."""
    query = await service.submit_query(session, settings, user_id, body)
    await session.commit()
    # After commit, so a worker never looks for a row that is not there yet. A failed publish leaves the
    # row pending for the recovery sweeper; the client's 202 stays true.
    await publisher.publish(query.id)
    QUERIES_SUBMITTED.labels(model=query.model).inc()
    response.headers["Location"] = f"/api/v1/query/{query.id}"
    return QueryAccepted(
        query_id=query.id, status=QueryStatus.PENDING, model=query.model, created_at=query.created_at
    )


@router.get("/{query_id}", response_model=QueryOut)
async def get(query_id: uuid.UUID, user_id: CurrentUserId, session: SessionDep) -> QueryOut:
    """One of the caller's queries; anybody else's is a 404."""
    return service.to_out(await service.get_query(session, user_id, query_id))


@router.get("", response_model=QueryPage)
async def list_(
    user_id: CurrentUserId,
    session: SessionDep,
    status_: Annotated[QueryStatus | None, Query(alias="status")] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> QueryPage:
    """The caller's queries, newest first."""
    return await service.list_queries(session, user_id, status=status_, cursor=cursor, limit=limit)
