"""SQL of deleting an account: the user row, and with it (ON DELETE CASCADE) its queries and limits."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import Query, QueryStatus, RefreshToken, User


async def live_query_ids(
    session: AsyncSession, user_id: uuid.UUID, changed_since: datetime
) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """The user's pending and running queries (they hold token reservations), and every query changed since
    `changed_since` (its event log may still be in Redis): unfinished ones are in both."""
    unfinished = Query.status.in_([QueryStatus.PENDING.value, QueryStatus.RUNNING.value])
    stmt = select(Query.id, unfinished).where(
        Query.user_id == user_id, or_(unfinished, Query.updated_at >= changed_since)
    )
    rows = (await session.execute(stmt)).all()
    return [q for q, pending in rows if pending], [q for q, _ in rows]


async def delete_user(session: AsyncSession, user_id: uuid.UUID) -> bool:
    """Delete the user, its refresh tokens and (by cascade) its queries, limits and idempotency keys."""
    await session.execute(delete(RefreshToken).where(RefreshToken.user_id == user_id))
    result = await session.execute(delete(User).where(User.id == user_id).returning(User.id))
    return result.one_or_none() is not None
