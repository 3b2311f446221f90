"""SQL of usage reports: sums over the caller's rows (an index-only scan of `ix_queries_user_usage`)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import Query


def usage_statement(user_id: uuid.UUID, start: datetime, end: datetime, group_by: str) -> Select[Any]:
    """Per UTC day or per model: queries and token sums of the user's rows created in [start, end)."""
    key: Any = func.to_char(func.timezone("UTC", Query.created_at), "YYYY-MM-DD") if group_by == "day" else Query.model
    return (
        select(
            key.label("key"),
            func.count().label("queries"),
            func.coalesce(func.sum(Query.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(Query.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(Query.total_tokens), 0).label("total_tokens"),
            func.coalesce(func.sum(Query.total_tokens).filter(Query.cached), 0).label("cached_tokens"),
            func.coalesce(func.sum(Query.reserved_tokens), 0).label("reserved_tokens"),
        )
        .where(Query.user_id == user_id, Query.created_at >= start, Query.created_at < end)
        .group_by(key)
        .order_by(key)
    )


async def usage_by(
    session: AsyncSession, user_id: uuid.UUID, start: datetime, end: datetime, group_by: str
) -> list[Any]:
    """The groups of `usage_statement`, as mappings."""
    stmt = usage_statement(user_id, start, end, group_by)
    return list((await session.execute(stmt)).mappings().all())
