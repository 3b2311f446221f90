"""SQL of deleting an account: the user row, and with it (ON DELETE CASCADE) its queries and limits."""

from __future__ import annotations

import uuid

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import Query, QueryStatus, RefreshToken, User


async def unfinished_query_ids(session: AsyncSession, user_id: uuid.UUID) -> list[uuid.UUID]:
    """The user's pending and running queries: they hold token reservations."""
    stmt = select(Query.id).where(
        Query.user_id == user_id, Query.status.in_([QueryStatus.PENDING.value, QueryStatus.RUNNING.value])
    )
    return list((await session.execute(stmt)).scalars())


async def delete_user(session: AsyncSession, user_id: uuid.UUID) -> bool:
    """Delete the user, its refresh tokens and (by cascade) its queries, limits and idempotency keys."""
    await session.execute(delete(RefreshToken).where(RefreshToken.user_id == user_id))
    result = await session.execute(delete(User).where(User.id == user_id).returning(User.id))
    return result.one_or_none() is not None
