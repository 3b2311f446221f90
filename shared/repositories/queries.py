"""All SQL that touches `queries`. Every state change is one guarded UPDATE."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import asyncpg
from sqlalchemy import Integer, Interval, String, Text, and_, bindparam, case, delete, func, or_, select, tuple_, update
from sqlalchemy import insert as sa_insert
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import TERMINAL_STATUSES, IdempotencyKey, Query, QueryStatus


class RowLike(Protocol):
    """A row read by key: SQLAlchemy's RowMapping or asyncpg's Record."""

    def __getitem__(self, key: str) -> Any: ...


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


# What the API shows of a row. Plain column rows, not ORM entities: reads are the hottest path.
_PUBLIC_COLUMNS = (
    Query.id,
    Query.prompt,
    Query.system,
    Query.model,
    Query.temperature,
    Query.max_tokens,
    Query.meta.label("meta"),
    Query.status,
    Query.response,
    Query.error_code,
    Query.error_message,
    Query.prompt_tokens,
    Query.completion_tokens,
    Query.total_tokens,
    Query.attempts,
    Query.cancel_requested_at,
    Query.created_at,
    Query.started_at,
    Query.finished_at,
)


_INSERT_COLUMNS = (
    "id", "user_id", "prompt", "system", "model", "temperature", "max_tokens", "meta", "status", "attempts",
    "created_at", "updated_at", "next_attempt_at",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class CompiledStatement:
    """A Core statement compiled once for asyncpg: the model stays the single source of the SQL."""

    sql: str
    names: tuple[str, ...]
    # Values of the binds the statement carries itself (e.g. `status = 'pending'`).
    fixed: Mapping[str, Any]

    @classmethod
    def of(cls, stmt: Any) -> CompiledStatement:
        compiled = stmt.compile(dialect=asyncpg_dialect())  # type: ignore[no-untyped-call]
        fixed = {k: (v.value if isinstance(v, QueryStatus) else v) for k, v in compiled.params.items()}
        return cls(compiled.string, tuple(compiled.positiontup or ()), fixed)

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        return [values[name] if name in values else self.fixed[name] for name in self.names]


_INSERT = CompiledStatement.of(sa_insert(Query).values({name: bindparam(name) for name in _INSERT_COLUMNS}))
_GET_FOR_USER = CompiledStatement.of(
    select(*_PUBLIC_COLUMNS).where(Query.id == bindparam("id"), Query.user_id == bindparam("user_id"))
)


async def insert(conn: asyncpg.Connection, **values: Any) -> None:
    """One autocommitted INSERT: a single round trip on the submit path."""
    await conn.execute(_INSERT.sql, *_INSERT.args(values))


async def insert_in_session(session: AsyncSession, **values: Any) -> None:
    """The same INSERT inside a session's transaction (when more must commit with it)."""
    await session.execute(sa_insert(Query).values(**values))


async def fetch_for_user(conn: asyncpg.Connection, query_id: uuid.UUID, user_id: uuid.UUID) -> RowLike | None:
    """The row if it exists and belongs to the user; another user's row is indistinguishable from none."""
    row: RowLike | None = await conn.fetchrow(
        _GET_FOR_USER.sql, *_GET_FOR_USER.args({"id": query_id, "user_id": user_id})
    )
    return row


async def get_for_user(session: AsyncSession, query_id: uuid.UUID, user_id: uuid.UUID) -> RowLike | None:
    """`fetch_for_user` inside a session (cancel, which has just written the row)."""
    stmt = select(*_PUBLIC_COLUMNS).where(Query.id == query_id, Query.user_id == user_id)
    return (await session.execute(stmt)).mappings().one_or_none()


async def list_for_user(
    session: AsyncSession,
    user_id: uuid.UUID,
    *,
    status: QueryStatus | None,
    before: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[RowLike]:
    """Newest first, keyset-paginated on (created_at, id)."""
    stmt = select(*_PUBLIC_COLUMNS).where(Query.user_id == user_id)
    if status is not None:
        stmt = stmt.where(Query.status == status)
    if before is not None:
        created_at, query_id = before
        stmt = stmt.where(or_(Query.created_at < created_at, and_(Query.created_at == created_at, Query.id < query_id)))
    stmt = stmt.order_by(Query.created_at.desc(), Query.id.desc()).limit(limit)
    return list((await session.execute(stmt)).mappings().all())


_CLAIM = CompiledStatement.of(
    update(Query)
    .where(Query.id == bindparam("id"), Query.status == QueryStatus.PENDING, Query.next_attempt_at <= func.now())
    .values(
        status=QueryStatus.RUNNING,
        attempts=Query.attempts + 1,
        lease_owner=bindparam("owner"),
        lease_expires_at=func.now() + bindparam("lease", type_=Interval()),
        started_at=func.coalesce(Query.started_at, func.now()),
        updated_at=func.now(),
    )
    .returning(Query.id, Query.attempts, Query.prompt, Query.system, Query.model, Query.temperature, Query.max_tokens)
)


async def claim(conn: asyncpg.Connection, query_id: uuid.UUID, owner: str, lease: timedelta) -> Claim | None:
    """pending → running in one statement; None when another delivery, a retry delay or a terminal state wins."""
    row = await conn.fetchrow(_CLAIM.sql, *_CLAIM.args({"id": query_id, "owner": owner, "lease": lease}))
    return Claim(*row.values()) if row is not None else None


_CANCEL_REQUESTED = Query.cancel_requested_at.is_not(None)
CANCELLED_CODE, CANCELLED_MESSAGE = "cancelled", "Cancelled by the client"


def _unless_cancelled(value: Any, cancelled_value: Any) -> Any:
    return case((_CANCEL_REQUESTED, cancelled_value), else_=value)


def _finish(status: QueryStatus, *, code: Any = None, message: Any = None, **values: Any) -> CompiledStatement:
    """An outcome write, guarded by the attempt that owns the row: a stale attempt writes nothing.

    A cancel requested while the call ran wins over every outcome: the row ends cancelled, with no answer
    but with the usage already spent.
    """
    new_status: Any = status.value
    if status is not QueryStatus.CANCELLED:
        new_status = _unless_cancelled(new_status, QueryStatus.CANCELLED.value)
        if "response" in values:
            values["response"] = _unless_cancelled(values["response"], None)
        code = _unless_cancelled(code, CANCELLED_CODE)
        message = _unless_cancelled(message, CANCELLED_MESSAGE)
    ends = status in TERMINAL_STATUSES
    return CompiledStatement.of(
        update(Query)
        .where(Query.id == bindparam("id"), Query.status == QueryStatus.RUNNING, Query.attempts == bindparam("attempt"))
        .values(
            status=new_status,
            error_code=code,
            error_message=message,
            finished_at=func.now() if ends else _unless_cancelled(None, func.now()),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=func.now(),
            **values,
        )
        .returning(Query.status)
    )


_COMPLETE = _finish(
    QueryStatus.COMPLETED,
    response=bindparam("response", type_=Text()),
    prompt_tokens=bindparam("prompt_tokens", type_=Integer()),
    completion_tokens=bindparam("completion_tokens", type_=Integer()),
    total_tokens=bindparam("total_tokens", type_=Integer()),
    llm_latency_ms=bindparam("latency_ms", type_=Integer()),
)
_FAIL = _finish(QueryStatus.FAILED, code=bindparam("code", type_=String()), message=bindparam("message", type_=Text()))
_RETRY = _finish(
    QueryStatus.PENDING,
    code=bindparam("code", type_=String()),
    message=bindparam("message", type_=Text()),
    next_attempt_at=func.now() + bindparam("delay", type_=Interval()),
)
_CANCEL = _finish(QueryStatus.CANCELLED, code=CANCELLED_CODE, message=CANCELLED_MESSAGE)
_RELEASE = _finish(QueryStatus.PENDING, next_attempt_at=func.now())


async def _write(conn: asyncpg.Connection, stmt: CompiledStatement, claim: Claim, **values: Any) -> QueryStatus | None:
    """The status the row now has, or None when the attempt no longer owns it and nothing was written."""
    status = await conn.fetchval(stmt.sql, *stmt.args({"id": claim.query_id, "attempt": claim.attempt, **values}))
    return QueryStatus(status) if status is not None else None


async def complete_attempt(
    conn: asyncpg.Connection,
    claim: Claim,
    *,
    response: str,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    total_tokens: int | None,
    latency_ms: int,
) -> QueryStatus | None:
    """running → completed (or cancelled, if a cancel came in meanwhile)."""
    return await _write(
        conn,
        _COMPLETE,
        claim,
        response=response,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=total_tokens,
        latency_ms=latency_ms,
    )


async def fail_attempt(conn: asyncpg.Connection, claim: Claim, *, code: str, message: str) -> QueryStatus | None:
    """running → failed (or cancelled, if a cancel came in meanwhile: the client was told it would be)."""
    return await _write(conn, _FAIL, claim, code=code, message=message)


async def retry_attempt(
    conn: asyncpg.Connection, claim: Claim, *, delay: timedelta, code: str, message: str
) -> QueryStatus | None:
    """running → pending, due after the delay (or cancelled, if a cancel came in meanwhile)."""
    return await _write(conn, _RETRY, claim, delay=delay, code=code, message=message)


async def cancel_attempt(conn: asyncpg.Connection, claim: Claim) -> QueryStatus | None:
    """running → cancelled, after the worker stopped the call."""
    return await _write(conn, _CANCEL, claim)


async def release_attempt(conn: asyncpg.Connection, claim: Claim) -> QueryStatus | None:
    """running → pending and due now (or cancelled): a shutting-down worker hands the query back."""
    return await _write(conn, _RELEASE, claim)


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
        .returning(Query.id, Query.cancel_requested_at.is_not(None))
        .execution_options(synchronize_session=False)
    )
    return {row[0]: bool(row[1]) for row in (await session.execute(stmt)).all()}


async def cancel_pending(session: AsyncSession, query_id: uuid.UUID, user_id: uuid.UUID) -> bool:
    """pending → cancelled at once: no worker can claim it afterwards."""
    stmt = (
        update(Query)
        .where(Query.id == query_id, Query.user_id == user_id, Query.status == QueryStatus.PENDING)
        .values(
            status=QueryStatus.CANCELLED,
            error_code="cancelled",
            error_message="Cancelled by the client",
            cancel_requested_at=func.now(),
            finished_at=func.now(),
            updated_at=func.now(),
        )
        .returning(Query.id)
    )
    return (await session.execute(stmt)).one_or_none() is not None


async def request_cancel(session: AsyncSession, query_id: uuid.UUID, user_id: uuid.UUID) -> bool:
    """Mark a running query; the worker that owns it stops the call and ends it cancelled."""
    stmt = (
        update(Query)
        .where(Query.id == query_id, Query.user_id == user_id, Query.status == QueryStatus.RUNNING)
        .values(cancel_requested_at=func.coalesce(Query.cancel_requested_at, func.now()), updated_at=func.now())
        .returning(Query.id)
    )
    return (await session.execute(stmt)).one_or_none() is not None


async def reclaim_expired_leases(session: AsyncSession, max_attempts: int, stale: timedelta, limit: int) -> int:
    """Running rows whose worker stopped renewing: back to pending, or to their end. Returns how many.

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
    ends = or_(_CANCEL_REQUESTED, exhausted)
    stmt = (
        update(Query)
        .where(Query.id.in_(expired))
        .values(
            status=case(
                (_CANCEL_REQUESTED, QueryStatus.CANCELLED.value),
                (exhausted, QueryStatus.FAILED.value),
                else_=QueryStatus.PENDING.value,
            ),
            lease_owner=None,
            lease_expires_at=None,
            next_attempt_at=func.now(),
            updated_at=case((ends, func.now()), else_=func.now() - stale),
            finished_at=case((ends, func.now()), else_=None),
            error_code=case((_CANCEL_REQUESTED, CANCELLED_CODE), (exhausted, "worker_lost"), else_=Query.error_code),
            error_message=case(
                (_CANCEL_REQUESTED, CANCELLED_MESSAGE),
                (exhausted, "The worker running this query stopped responding too many times"),
                else_=Query.error_message,
            ),
        )
        .returning(Query.id)
        .execution_options(synchronize_session=False)
    )
    return len((await session.execute(stmt)).all())


async def lock_stale_pending(session: AsyncSession, stale: timedelta, limit: int) -> list[uuid.UUID]:
    """Due pending rows untouched for `stale`: their message may be gone. Locked until the caller commits."""
    stmt = (
        select(Query.id)
        .where(
            Query.status == QueryStatus.PENDING,
            Query.next_attempt_at <= func.now(),
            Query.updated_at <= func.now() - stale,
        )
        .order_by(Query.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list((await session.execute(stmt)).scalars())


async def mark_resent(session: AsyncSession, query_ids: list[uuid.UUID]) -> None:
    """Restart the stale clock of rows whose message was just sent again."""
    if query_ids:
        await session.execute(update(Query).where(Query.id.in_(query_ids)).values(updated_at=func.now()))


async def get_idempotency_key(session: AsyncSession, user_id: uuid.UUID, key: str) -> IdempotencyKey | None:
    stmt = select(IdempotencyKey).where(
        IdempotencyKey.user_id == user_id, IdempotencyKey.key == key, IdempotencyKey.expires_at > func.now()
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def lock_idempotency_key(session: AsyncSession, user_id: uuid.UUID, key: str) -> bool:
    """Transaction-scoped advisory lock; False while another request holds the same key."""
    stmt = select(func.pg_try_advisory_xact_lock(func.hashtextextended(f"{user_id}:{key}", 0)))
    return bool((await session.execute(stmt)).scalar_one())


async def save_idempotency_key(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    key: str,
    request_hash: str,
    query_id: uuid.UUID,
    response: dict[str, Any],
    ttl: timedelta,
) -> None:
    # An expired row for the same key may still be there until the sweeper deletes it.
    await session.execute(delete(IdempotencyKey).where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == key))
    session.add(
        IdempotencyKey(
            user_id=user_id,
            key=key,
            request_hash=request_hash,
            query_id=query_id,
            response=response,
            expires_at=func.now() + ttl,
        )
    )
    await session.flush()


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
