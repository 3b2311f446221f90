"""`/v1/batches`: a file of requests run as queries at batch priority, under the caller's limits."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query

from api.compat import compat_router
from api.deps import CurrentUserId, HandlesDep
from shared.schemas_openai import BatchCreate
from shared.services import batches as service

router = compat_router()


@router.post("/batches")
async def create_batch(body: BatchCreate, user_id: CurrentUserId, handles: HandlesDep) -> dict[str, Any]:
    """A `validating` batch; its lines become queries in the workers."""
    async with handles.pool.acquire() as conn:
        row = await service.create(conn, user_id, body)
    # After the INSERT's commit; a lost message is re-sent by the sweeper.
    await service.send_advance(handles.publisher, row["id"])
    return service.batch_object(row)


@router.get("/batches/{batch_id}")
async def get_batch(batch_id: str, user_id: CurrentUserId, handles: HandlesDep) -> dict[str, Any]:
    async with handles.pool.acquire() as conn:
        return service.batch_object(await service.get(conn, user_id, batch_id))


@router.get("/batches")
async def list_batches(
    user_id: CurrentUserId,
    handles: HandlesDep,
    after: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    """The caller's batches, newest first; `after` is the last id of the previous page."""
    async with handles.pool.acquire() as conn:
        return await service.list_page(conn, user_id, after, limit)


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, user_id: CurrentUserId, handles: HandlesDep) -> dict[str, Any]:
    """validating/in_progress → cancelling → cancelled (finished lines keep their results); idempotent."""
    async with handles.pool.acquire() as conn:
        row, changed = await service.cancel(conn, user_id, batch_id)
    if changed:
        await service.send_advance(handles.publisher, row["id"])
    return service.batch_object(row)
