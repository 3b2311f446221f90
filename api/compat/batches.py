"""`/v1/batches`: a file of requests run as queries at batch priority, under the caller's limits."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query

from api.compat import compat_router
from api.compat.errors import openai_error_responses
from api.deps import CurrentUserId, HandlesDep
from shared.schemas_openai import Batch, BatchCreate, BatchList
from shared.services import batches as service

router = compat_router()


@router.post(
    "/batches",
    responses={200: {"model": Batch, "description": "The batch, `validating`"}, **openai_error_responses(400, 404)},
)
async def create_batch(body: BatchCreate, user_id: CurrentUserId, handles: HandlesDep) -> dict[str, Any]:
    """Create a batch over an uploaded `batch` file: it starts `validating`; its lines become queries.

    An input file that is missing (or another user's) is a 404; one of another purpose a 400."""
    async with handles.pool.acquire() as conn:
        row = await service.create(conn, user_id, body)
    # After the INSERT's commit; a lost message is re-sent by the sweeper.
    await service.send_advance(handles.publisher, row["id"])
    return service.batch_object(row)


@router.get(
    "/batches/{batch_id}", responses={200: {"model": Batch, "description": "The batch"}, **openai_error_responses(404)}
)
async def get_batch(batch_id: str, user_id: CurrentUserId, handles: HandlesDep) -> dict[str, Any]:
    """Retrieve a batch; anybody else's is a 404 like a missing one."""
    async with handles.pool.acquire() as conn:
        return service.batch_object(await service.get(conn, user_id, batch_id))


@router.get(
    "/batches", responses={200: {"model": BatchList, "description": "A page of batches"}, **openai_error_responses(404)}
)
async def list_batches(
    user_id: CurrentUserId,
    handles: HandlesDep,
    after: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    """List your batches, newest first; `after` is the last id of the previous page (an unknown one is a 404)."""
    async with handles.pool.acquire() as conn:
        return await service.list_page(conn, user_id, after, limit)


@router.post(
    "/batches/{batch_id}/cancel",
    responses={200: {"model": Batch, "description": "The batch as it stands"}, **openai_error_responses(404, 409)},
)
async def cancel_batch(batch_id: str, user_id: CurrentUserId, handles: HandlesDep) -> dict[str, Any]:
    """Cancel a batch: validating/in_progress → cancelling → cancelled (finished lines keep their results).

    Idempotent: a batch already cancelling or cancelled is returned as it is; a finished one is a 409."""
    async with handles.pool.acquire() as conn:
        row, changed = await service.cancel(conn, user_id, batch_id)
    if changed:
        await service.send_advance(handles.publisher, row["id"])
    return service.batch_object(row)
