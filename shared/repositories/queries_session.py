"""The query SQL that runs in a SQLAlchemy session: listing, live counts, leases and the recovery sweeps.

The caller owns the transaction (the API's session dependency, the worker's background loops).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import and_, case, delete, func, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import TERMINAL_STATUSES, IdempotencyKey, Query, QueryStatus
from shared.repositories.queries_common import (
    CANCEL_REQUESTED,
    CANCELLED_CODE,
    CANCELLED_MESSAGE,
    PUBLIC_COLUMNS,
    RowLike,
)


async def list_for_user(
    session: AsyncSession,
    user_id: uuid.UUID,
    *,
    status: QueryStatus | None,
    before: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[RowLike]:
    """Newest first, keyset-paginated on (created_at, id)."""
    stmt = select(*PUBLIC_COLUMNS).where(Query.user_id == user_id, Query.deleted_at.is_(None))
    if status is not None:
        stmt = stmt.where(Query.status == status)
    if before is not None:
        created_at, query_id = before
        stmt = stmt.where(or_(Query.created_at < created_at, and_(Query.created_at == created_at, Query.id < query_id)))
    stmt = stmt.order_by(Query.created_at.desc(), Query.id.desc()).limit(limit)
    return list((await session.execute(stmt)).mappings().all())


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


async def users_with_queued_work(session: AsyncSession) -> int:
    """How many users have pending queries (flow control: how many take turns), never which ones."""
    stmt = select(func.count(func.distinct(Query.user_id))).where(Query.status == QueryStatus.PENDING)
    return int((await session.execute(stmt)).scalar_one())


async def renew_leases(
    session: AsyncSession, claims: list[tuple[uuid.UUID, int]], owner: str, lease: timedelta
) -> dict[uuid.UUID, bool]:
    """Extend the leases this worker still holds; maps each held id to whether a cancel was requested."""
    if not claims:
        return {}
    stmt = (
        update(Query)
        .where(
            tuple_(Query.id, Query.attempts).in_(claims),
            Query.status == QueryStatus.RUNNING,
            Query.lease_owner == owner,
        )
        .values(lease_expires_at=func.now() + lease)
        .returning(Query.id, CANCEL_REQUESTED)
        .execution_options(synchronize_session=False)
    )
    return {row[0]: bool(row[1]) for row in (await session.execute(stmt)).all()}


WORKER_LOST_CODE = "worker_lost"
WORKER_LOST_MESSAGE = "The worker running this query stopped responding too many times"


async def reclaim_expired_leases(
    session: AsyncSession, max_attempts: int, stale: timedelta, limit: int
) -> list[tuple[uuid.UUID, QueryStatus]]:
    """Running rows whose worker stopped renewing: back to pending, or to their end. Returns each with its
    new status (the ended ones have a token reservation to settle).

    A row handed back is dated `stale` into the past, so the re-send step of the same sweep picks it up.
    """
    expired = (
        select(Query.id)
        .where(Query.status == QueryStatus.RUNNING, Query.lease_expires_at < func.now())
        .order_by(Query.lease_expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    exhausted = Query.attempts >= max_attempts
    ends = or_(CANCEL_REQUESTED, exhausted)
    stmt = (
        update(Query)
        .where(Query.id.in_(expired))
        .values(
            status=case(
                (CANCEL_REQUESTED, QueryStatus.CANCELLED.value),
                (exhausted, QueryStatus.FAILED.value),
                else_=QueryStatus.PENDING.value,
            ),
            lease_owner=None,
            lease_expires_at=None,
            next_attempt_at=func.now(),
            updated_at=case((ends, func.now()), else_=func.now() - stale),
            finished_at=case((ends, func.now()), else_=None),
            error_code=case((CANCEL_REQUESTED, CANCELLED_CODE), (exhausted, WORKER_LOST_CODE), else_=Query.error_code),
            error_message=case(
                (CANCEL_REQUESTED, CANCELLED_MESSAGE),
                (exhausted, WORKER_LOST_MESSAGE),
                else_=Query.error_message,
            ),
        )
        .returning(Query.id, Query.status)
        .execution_options(synchronize_session=False)
    )
    return [(row[0], QueryStatus(row[1])) for row in (await session.execute(stmt)).all()]


async def lock_stale_pending(session: AsyncSession, stale: timedelta, limit: int) -> list[tuple[uuid.UUID, str]]:
    """Due pending rows untouched for `stale` (id, model): their message may be gone. Locked until the caller
    commits."""
    stmt = (
        select(Query.id, Query.model)
        .where(
            Query.status == QueryStatus.PENDING,
            Query.next_attempt_at <= func.now(),
            Query.updated_at <= func.now() - stale,
        )
        .order_by(Query.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [(query_id, model) for query_id, model in (await session.execute(stmt)).all()]


async def mark_resent(session: AsyncSession, query_ids: list[uuid.UUID]) -> None:
    """Restart the stale clock of rows whose message was just sent again (or that a dispatcher has in hand)."""
    if query_ids:
        await session.execute(update(Query).where(Query.id.in_(query_ids)).values(updated_at=func.now()))


async def delete_expired_idempotency_keys(session: AsyncSession, limit: int) -> int:
    """Forget keys past their retention, a batch at a time."""
    expired = (
        select(IdempotencyKey.user_id, IdempotencyKey.key)
        .where(IdempotencyKey.expires_at < func.now())
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    stmt = delete(IdempotencyKey).where(tuple_(IdempotencyKey.user_id, IdempotencyKey.key).in_(expired))
    result = await session.execute(stmt.returning(IdempotencyKey.key))
    return len(result.all())


async def purge_finished_before(session: AsyncSession, cutoff: datetime, limit: int) -> int:
    """Delete up to `limit` terminal rows finished before `cutoff` (retention); returns how many."""
    old = (
        select(Query.id)
        .where(Query.finished_at < cutoff, Query.status.in_([s.value for s in TERMINAL_STATUSES]))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    result = await session.execute(delete(Query).where(Query.id.in_(old)).returning(Query.id))
    return len(result.all())
