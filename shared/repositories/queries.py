"""All SQL that touches `queries`. Every state change is one guarded UPDATE."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import Query, QueryStatus


@dataclass(frozen=True, slots=True)
class Claim:
    """What a worker needs to run one attempt; `attempt` fences its later writes."""

    query_id: uuid.UUID
    attempt: int
    prompt: str
    system: str | None
    model: str
    temperature: float | None
    max_tokens: int | None


async def get_for_user(session: AsyncSession, query_id: uuid.UUID, user_id: uuid.UUID) -> Query | None:
    """The row if it exists and belongs to the user; another user's row is indistinguishable from none."""
    stmt = select(Query).where(Query.id == query_id, Query.user_id == user_id)
    return (await session.execute(stmt)).scalar_one_or_none()


async def list_for_user(
    session: AsyncSession,
    user_id: uuid.UUID,
    *,
    status: QueryStatus | None,
    before: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[Query]:
    """Newest first, keyset-paginated on (created_at, id)."""
    stmt = select(Query).where(Query.user_id == user_id)
    if status is not None:
        stmt = stmt.where(Query.status == status)
    if before is not None:
        created_at, query_id = before
        stmt = stmt.where(
            or_(Query.created_at < created_at, and_(Query.created_at == created_at, Query.id < query_id))
        )
    stmt = stmt.order_by(Query.created_at.desc(), Query.id.desc()).limit(limit)
    return list((await session.execute(stmt)).scalars())


async def claim(session: AsyncSession, query_id: uuid.UUID, owner: str, lease: timedelta) -> Claim | None:
    """pending → running in one statement; None when another delivery, a retry delay or a terminal state wins."""
    now = func.now()
    stmt = (
        update(Query)
        .where(Query.id == query_id, Query.status == QueryStatus.PENDING, Query.next_attempt_at <= now)
        .values(
            status=QueryStatus.RUNNING,
            attempts=Query.attempts + 1,
            lease_owner=owner,
            lease_expires_at=now + lease,
            started_at=func.coalesce(Query.started_at, now),
            updated_at=now,
        )
        .returning(
            Query.id,
            Query.attempts,
            Query.prompt,
            Query.system,
            Query.model,
            Query.temperature,
            Query.max_tokens,
        )
    )
    row = (await session.execute(stmt)).one_or_none()
    return Claim(*row) if row is not None else None


async def finish_attempt(session: AsyncSession, query_id: uuid.UUID, attempt: int, **values: Any) -> bool:
    """Write the outcome of an attempt only if that attempt still owns the row."""
    stmt = (
        update(Query)
        .where(Query.id == query_id, Query.status == QueryStatus.RUNNING, Query.attempts == attempt)
        .values(lease_owner=None, lease_expires_at=None, updated_at=func.now(), **values)
        .returning(Query.id)
    )
    return (await session.execute(stmt)).one_or_none() is not None


async def status_of(session: AsyncSession, query_id: uuid.UUID) -> tuple[str, datetime] | None:
    """(status, next_attempt_at), to explain why a claim did not happen."""
    stmt = select(Query.status, Query.next_attempt_at).where(Query.id == query_id)
    row = (await session.execute(stmt)).one_or_none()
    return (row[0], row[1]) if row is not None else None


async def live_stats(session: AsyncSession) -> tuple[dict[str, int], float | None]:
    """Counts of pending/running rows and the age in seconds of the oldest pending one."""
    counts_stmt = (
        select(Query.status, func.count())
        .where(Query.status.in_([QueryStatus.PENDING, QueryStatus.RUNNING]))
        .group_by(Query.status)
    )
    counts = {status: int(n) for status, n in (await session.execute(counts_stmt)).all()}
    age_stmt = select(func.extract("epoch", func.now() - func.min(Query.created_at))).where(
        Query.status == QueryStatus.PENDING
    )
    age = (await session.execute(age_stmt)).scalar_one_or_none()
    return counts, float(age) if age is not None else None
