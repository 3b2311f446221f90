"""SQL of batches and their items (raw asyncpg). A batch row is locked (`FOR UPDATE SKIP LOCKED`) by the
one worker that moves it a step, so duplicate task deliveries and the sweeper never step on each other."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from shared.models import BATCH_LIVE_STATUSES, BatchStatus
from shared.repositories.queries_common import RowLike

_LIVE = [s.value for s in BATCH_LIVE_STATUSES]
_CANCELLABLE = [BatchStatus.VALIDATING.value, BatchStatus.IN_PROGRESS.value]
# Columns a step may set (a whitelist: the names are interpolated into the UPDATE).
_UPDATABLE = frozenset(
    {
        "status",
        "errors",
        "output_file_id",
        "error_file_id",
        "request_total",
        "request_completed",
        "request_failed",
        "read_chunk",
        "read_offset",
        "lines_read",
        "input_done",
        "next_check_at",
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelled_at",
    }
)

_INSERTABLE = _UPDATABLE | {
    "id",
    "user_id",
    "input_file_id",
    "endpoint",
    "completion_window",
    "metadata",
    "created_at",
    "updated_at",
    "expires_at",
    "output_expires_seconds",
}


async def insert(conn: asyncpg.Connection, **values: Any) -> RowLike:
    unknown = set(values) - _INSERTABLE
    if unknown:
        raise ValueError(f"not insertable: {sorted(unknown)}")
    names = list(values)
    params = ", ".join(f"${i + 1}" for i in range(len(names)))
    row: RowLike = await conn.fetchrow(
        f"INSERT INTO batches ({', '.join(names)}) VALUES ({params}) RETURNING *",  # noqa: S608 - whitelisted names
        *values.values(),
    )
    return row


async def get_for_user(conn: asyncpg.Connection, batch_id: uuid.UUID, user_id: uuid.UUID) -> RowLike | None:
    row: RowLike | None = await conn.fetchrow("SELECT * FROM batches WHERE id = $1 AND user_id = $2", batch_id, user_id)
    return row


async def list_for_user(
    conn: asyncpg.Connection, user_id: uuid.UUID, *, after: uuid.UUID | None, limit: int
) -> list[RowLike]:
    """The user's batches, newest first; `after` is the last batch id of the previous page."""
    if after is None:
        rows = await conn.fetch(
            "SELECT * FROM batches WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2", user_id, limit
        )
    else:
        rows = await conn.fetch(
            "SELECT b.* FROM batches b, batches a WHERE a.id = $2 AND a.user_id = $1 AND b.user_id = $1 "
            "AND (b.created_at, b.id) < (a.created_at, a.id) ORDER BY b.created_at DESC, b.id DESC LIMIT $3",
            user_id,
            after,
            limit,
        )
    return list(rows)


async def request_cancel(conn: asyncpg.Connection, batch_id: uuid.UUID, user_id: uuid.UUID) -> RowLike | None:
    """validating | in_progress → cancelling; the row as it now is, else None."""
    row: RowLike | None = await conn.fetchrow(
        "UPDATE batches SET status = 'cancelling', cancelling_at = now(), next_check_at = now(), updated_at = now() "
        "WHERE id = $1 AND user_id = $2 AND status = ANY($3::text[]) RETURNING *",
        batch_id,
        user_id,
        _CANCELLABLE,
    )
    return row


async def lock(conn: asyncpg.Connection, batch_id: uuid.UUID) -> RowLike | None:
    """The live batch, locked for this transaction; None if another worker holds it or it has ended."""
    row: RowLike | None = await conn.fetchrow(
        "SELECT * FROM batches WHERE id = $1 AND status = ANY($2::text[]) FOR UPDATE SKIP LOCKED", batch_id, _LIVE
    )
    return row


async def update(conn: asyncpg.Connection, batch_id: uuid.UUID, **values: Any) -> None:
    unknown = set(values) - _UPDATABLE
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    sets = ", ".join(f"{name} = ${i + 2}" for i, name in enumerate(values))
    statement = f"UPDATE batches SET {sets}, updated_at = now() WHERE id = $1"  # noqa: S608 - whitelisted names
    await conn.execute(statement, batch_id, *values.values())


async def add_items(conn: asyncpg.Connection, batch_id: uuid.UUID, items: list[tuple[Any, ...]]) -> None:
    """Items as (line_no, custom_id, query_id, error_code, error_message)."""
    await conn.executemany(
        "INSERT INTO batch_items (batch_id, line_no, custom_id, query_id, error_code, error_message) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        [(batch_id, *item) for item in items],
    )


async def counts(conn: asyncpg.Connection, batch_id: uuid.UUID) -> RowLike:
    """How the batch's lines stand: completed, failed (refused lines included) and still live."""
    row: RowLike = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE q.status = 'completed') AS completed, "
        "count(*) FILTER (WHERE i.error_code IS NOT NULL OR q.status IN ('failed', 'cancelled') "
        "OR (i.query_id IS NULL AND i.error_code IS NULL)) AS failed, "
        "count(*) FILTER (WHERE q.status IN ('pending', 'running')) AS live "
        "FROM batch_items i LEFT JOIN queries q ON q.id = i.query_id WHERE i.batch_id = $1",
        batch_id,
    )
    return row


async def live_query_ids(conn: asyncpg.Connection, batch_id: uuid.UUID, limit: int) -> list[uuid.UUID]:
    """Queries of the batch still pending or running, with no cancel asked for yet."""
    rows = await conn.fetch(
        "SELECT q.id FROM batch_items i JOIN queries q ON q.id = i.query_id WHERE i.batch_id = $1 "
        "AND q.status IN ('pending', 'running') AND q.cancel_requested_at IS NULL LIMIT $2",
        batch_id,
        limit,
    )
    return [r["id"] for r in rows]


async def items_page(conn: asyncpg.Connection, batch_id: uuid.UUID, after_line: int, limit: int) -> list[RowLike]:
    """Items in line order with their query's columns (null for a refused line)."""
    rows = await conn.fetch(
        "SELECT q.*, q.metadata AS meta, i.line_no AS item_line_no, i.custom_id AS item_custom_id, "
        "i.query_id AS item_query_id, "
        "i.error_code AS item_error_code, i.error_message AS item_error_message "
        "FROM batch_items i LEFT JOIN queries q ON q.id = i.query_id "
        "WHERE i.batch_id = $1 AND i.line_no > $2 ORDER BY i.line_no LIMIT $3",
        batch_id,
        after_line,
        limit,
    )
    return list(rows)


async def claim_overdue(conn: asyncpg.Connection, now: datetime, defer_until: datetime, limit: int) -> list[uuid.UUID]:
    """Live batches whose next step is overdue (its task message was lost); their next check is deferred."""
    rows = await conn.fetch(
        "UPDATE batches SET next_check_at = $2 WHERE id IN (SELECT id FROM batches "
        "WHERE status = ANY($3::text[]) AND next_check_at < $1 ORDER BY next_check_at LIMIT $4 "
        "FOR UPDATE SKIP LOCKED) RETURNING id",
        now,
        defer_until,
        _LIVE,
        limit,
    )
    return [r["id"] for r in rows]
