"""The query SQL that runs on a raw asyncpg connection: each statement compiled once from the model.

The request hot path (submit, read, cancel) and every worker transition of an attempt (claim, outcome
writes). Every state change is one guarded UPDATE; a statement outside `conn.transaction()` autocommits.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
from sqlalchemy import Integer, Interval, String, Text, bindparam, case, delete, exists, func, or_, select, update
from sqlalchemy import insert as sa_insert
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect

from shared.models import TERMINAL_STATUSES, IdempotencyKey, Query, QueryStatus, WebhookEndpoint
from shared.repositories.queries_common import (
    CANCEL_REQUESTED,
    CANCELLED_CODE,
    CANCELLED_MESSAGE,
    PUBLIC_COLUMNS,
    RowLike,
)


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
    # Whether the query had a webhook target when claimed (its own URL, or its account's enabled endpoint):
    # only then does its end send the `webhooks.deliver` kick. An endpoint set during the call is still
    # served: the trigger writes its outbox row with the terminal write and the webhook sweep sends it.
    webhook: bool = True
    # A `/v1` conversation's turns before `prompt` (`queries.history`); None for a single prompt.
    history: list[dict[str, str]] | None = None
    # The participant name of `prompt` (`queries.prompt_name`), when it has one.
    prompt_name: str | None = None


_INSERT_COLUMNS = (
    "id", "user_id", "prompt", "system", "history", "prompt_name", "model", "temperature", "max_tokens", "meta",
    "priority", "status", "attempts", "created_at", "updated_at", "next_attempt_at", "reserved_tokens", "response",
    "prompt_tokens", "completion_tokens", "total_tokens", "cached", "started_at", "finished_at", "webhook_url",
    "background",
)  # fmt: skip
_INSERT = CompiledStatement.of(sa_insert(Query).values({name: bindparam(name) for name in _INSERT_COLUMNS}))
_FETCH_FOR_USER = CompiledStatement.of(
    select(*PUBLIC_COLUMNS).where(
        Query.id == bindparam("id"), Query.user_id == bindparam("user_id"), Query.deleted_at.is_(None)
    )
)


async def insert(conn: asyncpg.Connection, **values: Any) -> None:
    """One INSERT of a new query: a single round trip on the submit path."""
    await conn.execute(_INSERT.sql, *_INSERT.args(values))


async def fetch_for_user(conn: asyncpg.Connection, query_id: uuid.UUID, user_id: uuid.UUID) -> RowLike | None:
    """The row if it exists, belongs to the user and was not deleted; anything else is indistinguishable."""
    row: RowLike | None = await conn.fetchrow(
        _FETCH_FOR_USER.sql, *_FETCH_FOR_USER.args({"id": query_id, "user_id": user_id})
    )
    return row


_CANCEL_PENDING = CompiledStatement.of(
    update(Query)
    .where(Query.id == bindparam("id"), Query.user_id == bindparam("user_id"), Query.status == QueryStatus.PENDING)
    .values(
        status=QueryStatus.CANCELLED,
        error_code=CANCELLED_CODE,
        error_message=CANCELLED_MESSAGE,
        cancel_requested_at=func.now(),
        finished_at=func.now(),
        updated_at=func.now(),
    )
    .returning(*PUBLIC_COLUMNS)
)
_REQUEST_CANCEL = CompiledStatement.of(
    update(Query)
    .where(Query.id == bindparam("id"), Query.user_id == bindparam("user_id"), Query.status == QueryStatus.RUNNING)
    .values(cancel_requested_at=func.coalesce(Query.cancel_requested_at, func.now()), updated_at=func.now())
    .returning(*PUBLIC_COLUMNS)
)


async def cancel_pending(conn: asyncpg.Connection, query_id: uuid.UUID, user_id: uuid.UUID) -> RowLike | None:
    """pending → cancelled at once (no worker can claim it afterwards); the row as it now is, else None."""
    row: RowLike | None = await conn.fetchrow(
        _CANCEL_PENDING.sql, *_CANCEL_PENDING.args({"id": query_id, "user_id": user_id})
    )
    return row


async def request_cancel(conn: asyncpg.Connection, query_id: uuid.UUID, user_id: uuid.UUID) -> RowLike | None:
    """Mark a running query (its worker stops the call and ends it cancelled); the row as it now is, else None."""
    row: RowLike | None = await conn.fetchrow(
        _REQUEST_CANCEL.sql, *_REQUEST_CANCEL.args({"id": query_id, "user_id": user_id})
    )
    return row


_LOCK_IDEMPOTENCY_KEY = CompiledStatement.of(
    select(func.pg_try_advisory_xact_lock(func.hashtextextended(bindparam("lock_key", type_=String()), 0)))
)
_GET_IDEMPOTENCY_KEY = CompiledStatement.of(
    select(IdempotencyKey.request_hash, IdempotencyKey.response).where(
        IdempotencyKey.user_id == bindparam("user_id"),
        IdempotencyKey.key == bindparam("key"),
        IdempotencyKey.expires_at > func.now(),
    )
)
_DELETE_IDEMPOTENCY_KEY = CompiledStatement.of(
    delete(IdempotencyKey).where(IdempotencyKey.user_id == bindparam("user_id"), IdempotencyKey.key == bindparam("key"))
)
_INSERT_IDEMPOTENCY_KEY = CompiledStatement.of(
    sa_insert(IdempotencyKey).values(
        user_id=bindparam("user_id"),
        key=bindparam("key"),
        request_hash=bindparam("request_hash"),
        query_id=bindparam("query_id"),
        response=bindparam("response"),
        expires_at=func.now() + bindparam("ttl", type_=Interval()),
    )
)


async def lock_idempotency_key(conn: asyncpg.Connection, user_id: uuid.UUID, key: str) -> bool:
    """Transaction-scoped advisory lock; False while another request holds the same key."""
    stmt = _LOCK_IDEMPOTENCY_KEY
    return bool(await conn.fetchval(stmt.sql, *stmt.args({"lock_key": f"{user_id}:{key}"})))


async def get_idempotency_key(conn: asyncpg.Connection, user_id: uuid.UUID, key: str) -> RowLike | None:
    """The live record of a key (`request_hash`, `response`), or None."""
    stmt = _GET_IDEMPOTENCY_KEY
    row: RowLike | None = await conn.fetchrow(stmt.sql, *stmt.args({"user_id": user_id, "key": key}))
    return row


async def save_idempotency_key(
    conn: asyncpg.Connection,
    *,
    user_id: uuid.UUID,
    key: str,
    request_hash: str,
    query_id: uuid.UUID,
    response: dict[str, Any],
    ttl: timedelta,
) -> None:
    """Record the response to replay for this key, until `ttl` from now."""
    # An expired row for the same key may still be there until the sweeper deletes it.
    await conn.execute(_DELETE_IDEMPOTENCY_KEY.sql, *_DELETE_IDEMPOTENCY_KEY.args({"user_id": user_id, "key": key}))
    values = {
        "user_id": user_id,
        "key": key,
        "request_hash": request_hash,
        "query_id": query_id,
        "response": response,
        "ttl": ttl,
    }
    await conn.execute(_INSERT_IDEMPOTENCY_KEY.sql, *_INSERT_IDEMPOTENCY_KEY.args(values))


_HAS_WEBHOOK = or_(
    Query.webhook_url.is_not(None),
    exists().where(
        WebhookEndpoint.user_id == Query.user_id,
        WebhookEndpoint.url.is_not(None),
        WebhookEndpoint.disabled_at.is_(None),
    ),
)
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
    .returning(
        Query.id,
        Query.attempts,
        Query.prompt,
        Query.system,
        Query.model,
        Query.temperature,
        Query.max_tokens,
        _HAS_WEBHOOK,
        Query.history,
        Query.prompt_name,
    )
)


_PENDING_MODEL = CompiledStatement.of(
    select(Query.model).where(Query.id == bindparam("id"), Query.status == QueryStatus.PENDING)
)


async def pending_model(conn: asyncpg.Connection, query_id: uuid.UUID) -> str | None:
    """The model of a pending query (None when it is not pending): a read, where a claim would write."""
    model: str | None = await conn.fetchval(_PENDING_MODEL.sql, *_PENDING_MODEL.args({"id": query_id}))
    return model


async def claim(conn: asyncpg.Connection, query_id: uuid.UUID, owner: str, lease: timedelta) -> Claim | None:
    """pending → running in one statement; None when another delivery, a retry delay or a terminal state wins."""
    row = await conn.fetchrow(_CLAIM.sql, *_CLAIM.args({"id": query_id, "owner": owner, "lease": lease}))
    return Claim(*row.values()) if row is not None else None


# Flow control: the next due row of a model in fair order, claimed like `_CLAIM`. Weighted fair queuing by
# user (`fair_turns`): the user with due work and the smallest virtual time goes first (a newcomer, or a user
# back after a pause, starts one turn before the smallest among those waiting: it goes next) and its time advances by
# 1/weight (admin-set, `user_limits.fair_weight`). Interactive rows come before batch rows unless these waited
# BATCH_AGEING_SECONDS; a user holding more than its admin-set share of the model's calls in flight comes last
# (the cap never leaves the budget idle). SKIP LOCKED: claimers never wait on each other.
_CLAIM_FAIR_SQL = """
WITH due AS (
  SELECT q.user_id,
    min(CASE WHEN q.priority = 'interactive' OR q.created_at <= now() - $3::interval THEN 0 ELSE 1 END) AS klass,
    min(q.next_attempt_at) AS oldest
  FROM queries q
  WHERE q.status = 'pending' AND q.model = $1 AND q.next_attempt_at <= now()
  GROUP BY q.user_id
), busy AS (
  SELECT user_id, count(*) AS n FROM queries WHERE status = 'running' AND model = $1 GROUP BY user_id
), total AS (
  SELECT coalesce(sum(n), 0) AS n FROM busy
), floor AS (
  SELECT coalesce(min(f.vtime), 0) AS v FROM fair_turns f JOIN due d ON d.user_id = f.user_id WHERE f.model = $1
), pick AS (
  SELECT d.user_id, coalesce(l.fair_weight, 1) AS w, greatest(coalesce(f.vtime, 0), fl.v - 1) AS vt
  FROM due d
  LEFT JOIN busy b ON b.user_id = d.user_id
  LEFT JOIN user_limits l ON l.user_id = d.user_id
  LEFT JOIN fair_turns f ON f.model = $1 AND f.user_id = d.user_id
  CROSS JOIN total t
  CROSS JOIN floor fl
  ORDER BY
    (l.max_share IS NOT NULL AND coalesce(b.n, 0) >= l.max_share * (t.n + 1)),
    d.klass,
    greatest(coalesce(f.vtime, 0), fl.v - 1),
    d.oldest
  LIMIT 1
), next AS (
  SELECT q.id
  FROM queries q JOIN pick p ON q.user_id = p.user_id
  WHERE q.status = 'pending' AND q.model = $1 AND q.next_attempt_at <= now()
  ORDER BY CASE WHEN q.priority = 'interactive' OR q.created_at <= now() - $3::interval THEN 0 ELSE 1 END,
    q.next_attempt_at, q.created_at
  LIMIT 1
  FOR UPDATE OF q SKIP LOCKED
), claimed AS (
  UPDATE queries SET
    status = 'running',
    attempts = queries.attempts + 1,
    lease_owner = $2,
    lease_expires_at = now() + $4::interval,
    started_at = coalesce(queries.started_at, now()),
    updated_at = now()
  FROM next
  WHERE queries.id = next.id AND queries.status = 'pending'
  RETURNING queries.id, queries.attempts, queries.prompt, queries.system, queries.model, queries.temperature,
    queries.max_tokens, (queries.webhook_url IS NOT NULL OR EXISTS (
      SELECT 1 FROM webhook_endpoints e
      WHERE e.user_id = queries.user_id AND e.url IS NOT NULL AND e.disabled_at IS NULL
    )), queries.history, queries.prompt_name
), turn AS (
  INSERT INTO fair_turns (model, user_id, vtime)
  SELECT $1, p.user_id, p.vt + 1.0 / p.w FROM pick p WHERE EXISTS (SELECT 1 FROM claimed)
  ON CONFLICT (model, user_id) DO UPDATE SET vtime = excluded.vtime
)
SELECT * FROM claimed
"""
# A claim given back to wait for the budget gives its turn back too: waiting must not cost a user its turn.
_RETURN_TURN_SQL = """
UPDATE fair_turns f SET vtime = f.vtime - 1.0 / coalesce(l.fair_weight, 1)
FROM queries q LEFT JOIN user_limits l ON l.user_id = q.user_id
WHERE q.id = $1 AND f.model = q.model AND f.user_id = q.user_id
"""


async def claim_next_fair(
    conn: asyncpg.Connection, model: str, owner: str, lease: timedelta, batch_ageing: timedelta
) -> Claim | None:
    """Claim the model's next due pending row in fair order (see `_CLAIM_FAIR_SQL`); None when none is free."""
    row = await conn.fetchrow(_CLAIM_FAIR_SQL, model, owner, batch_ageing, lease)
    return Claim(*row.values()) if row is not None else None


def _unless_cancelled(value: Any, cancelled_value: Any) -> Any:
    return case((CANCEL_REQUESTED, cancelled_value), else_=value)


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
# Waiting for the upstream budget is not an attempt: the claim's count is given back. No call was made under
# this attempt number, so no late write can carry it.
_UNCLAIM = _finish(
    QueryStatus.PENDING,
    attempts=Query.attempts - 1,
    # A first claim given back never started: the row shows no start until a call really begins.
    started_at=case((Query.attempts == 1, None), else_=Query.started_at),
    next_attempt_at=func.now() + bindparam("delay", type_=Interval()),
)


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


async def unclaim_attempt(conn: asyncpg.Connection, claim: Claim, *, delay: timedelta) -> QueryStatus | None:
    """running → pending, due after `delay`, with `attempts` back as it was: the claim made no call (it waits
    for the upstream budget). Cancelled instead if a cancel came in meanwhile."""
    return await _write(conn, _UNCLAIM, claim, delay=delay)


async def return_turn(conn: asyncpg.Connection, query_id: uuid.UUID) -> None:
    """Undo the fair turn a claim took (`claim_next_fair`) when the claim is given back unused."""
    await conn.execute(_RETURN_TURN_SQL, query_id)


_ERASE = CompiledStatement.of(
    update(Query)
    .where(
        Query.id == bindparam("id"),
        Query.user_id == bindparam("user_id"),
        # Terminal; spelled as two comparisons because an IN list does not compile to a fixed statement.
        Query.status != QueryStatus.PENDING,
        Query.status != QueryStatus.RUNNING,
        Query.deleted_at.is_(None),
    )
    .values(
        prompt="",
        system=None,
        history=None,
        prompt_name=None,
        response=None,
        meta=None,
        deleted_at=func.now(),
        updated_at=func.now(),
    )
    .returning(Query.id)
)


async def erase(conn: asyncpg.Connection, query_id: uuid.UUID, user_id: uuid.UUID) -> bool:
    """Erase the content of the user's terminal query (usage columns stay); False when none matched."""
    return await conn.fetchval(_ERASE.sql, *_ERASE.args({"id": query_id, "user_id": user_id})) is not None


_FETCH_ANY = CompiledStatement.of(select(Query.user_id, *PUBLIC_COLUMNS).where(Query.id == bindparam("id")))


async def fetch_any(conn: asyncpg.Connection, query_id: uuid.UUID) -> RowLike | None:
    """Any user's query with its owner (admin reads)."""
    row: RowLike | None = await conn.fetchrow(_FETCH_ANY.sql, *_FETCH_ANY.args({"id": query_id}))
    return row


_REQUEUE = CompiledStatement.of(
    update(Query)
    .where(Query.id == bindparam("id"), Query.status == QueryStatus.FAILED, Query.deleted_at.is_(None))
    .values(
        status=QueryStatus.PENDING,
        error_code=None,
        error_message=None,
        finished_at=None,
        lease_owner=None,
        lease_expires_at=None,
        next_attempt_at=func.now(),
        updated_at=func.now(),
    )
    .returning(Query.user_id, Query.reserved_tokens)
)


async def requeue_failed(conn: asyncpg.Connection, query_id: uuid.UUID) -> RowLike | None:
    """failed → pending, due now; `attempts` stays (it fences stale attempts and must never go back)."""
    row: RowLike | None = await conn.fetchrow(_REQUEUE.sql, *_REQUEUE.args({"id": query_id}))
    return row
