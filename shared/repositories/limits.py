"""SQL of the per-user limit overrides (`user_limits`)."""

from __future__ import annotations

import uuid

import asyncpg
from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import UserLimits
from shared.repositories.queries_common import RowLike


async def fetch_overrides(conn: asyncpg.Connection, user_id: uuid.UUID) -> RowLike | None:
    """The user's overrides, or None when they have none (the submit path reads this, cached)."""
    row: RowLike | None = await conn.fetchrow(
        "SELECT requests_per_minute, max_pending, token_budget FROM user_limits WHERE user_id = $1", user_id
    )
    return row


async def get_overrides(session: AsyncSession, user_id: uuid.UUID) -> UserLimits | None:
    return await session.get(UserLimits, user_id)


async def set_overrides(
    session: AsyncSession,
    user_id: uuid.UUID,
    *,
    requests_per_minute: int | None,
    max_pending: int | None,
    token_budget: int | None,
    fair_weight: int | None = None,
    max_share: float | None = None,
    updated_by: uuid.UUID,
) -> None:
    """Insert or replace the user's overrides (NULL: the default)."""
    values = {
        "requests_per_minute": requests_per_minute,
        "max_pending": max_pending,
        "token_budget": token_budget,
        "fair_weight": fair_weight,
        "max_share": max_share,
        "updated_by": updated_by,
        "updated_at": func.now(),
    }
    stmt = insert(UserLimits).values(user_id=user_id, **values)
    await session.execute(stmt.on_conflict_do_update(index_elements=[UserLimits.user_id], set_=values))
