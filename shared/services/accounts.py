"""Deleting an account erases everything it owns."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from shared.errors import NotFound
from shared.limits import Limiter
from shared.repositories import accounts as repo


async def delete_account(session: AsyncSession, limiter: Limiter, user_id: uuid.UUID) -> None:
    """Delete the user with its queries (prompts, answers, usage), limits and refresh tokens.

    Queries still pending or running go too: a worker that holds one finds its row gone and writes nothing.
    Their token reservations are released.
    """
    unfinished = await repo.unfinished_query_ids(session, user_id)
    if not await repo.delete_user(session, user_id):
        raise NotFound("User not found", code="user_not_found")
    for query_id in unfinished:
        await limiter.settle_quietly(query_id, 0)
