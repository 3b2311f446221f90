"""SQL of files: a row per file, its content as ordered 1 MiB `bytea` chunks (raw asyncpg)."""

from __future__ import annotations

import uuid

import asyncpg

from shared.repositories.queries_common import RowLike

# A file past its `expires_at` is gone for its owner at once, before the workers' sweep deletes it.
_LIVE = "(expires_at IS NULL OR expires_at > now())"


async def insert(
    conn: asyncpg.Connection,
    *,
    file_id: uuid.UUID,
    user_id: uuid.UUID,
    purpose: str,
    filename: str,
    expires_seconds: int | None,
) -> None:
    """The file's row, empty until `finish` records its size (in the same transaction as its chunks); it
    expires `expires_seconds` after its `created_at` (never when None)."""
    await conn.execute(
        "INSERT INTO files (id, user_id, purpose, filename, bytes, line_count, expires_at) "
        "VALUES ($1, $2, $3, $4, 0, 0, now() + $5::integer * interval '1 second')",
        file_id,
        user_id,
        purpose,
        filename,
        expires_seconds,
    )


async def add_chunk(conn: asyncpg.Connection, file_id: uuid.UUID, seq: int, data: bytes) -> None:
    await conn.execute("INSERT INTO file_chunks (file_id, seq, data) VALUES ($1, $2, $3)", file_id, seq, data)


async def finish(conn: asyncpg.Connection, file_id: uuid.UUID, size: int, line_count: int) -> RowLike:
    row: RowLike = await conn.fetchrow(
        "UPDATE files SET bytes = $2, line_count = $3 WHERE id = $1 RETURNING *",
        file_id,
        size,
        line_count,
    )
    return row


async def get_for_user(conn: asyncpg.Connection, file_id: uuid.UUID, user_id: uuid.UUID) -> RowLike | None:
    """The file if it belongs to the user and has not expired; anybody else's, or an expired one, is
    indistinguishable from a missing one."""
    row: RowLike | None = await conn.fetchrow(
        f"SELECT * FROM files WHERE id = $1 AND user_id = $2 AND {_LIVE}",  # noqa: S608 - a fixed clause
        file_id,
        user_id,
    )
    return row


async def chunk(conn: asyncpg.Connection, file_id: uuid.UUID, seq: int) -> bytes | None:
    """One chunk of a file's content, or None past its end."""
    data: bytes | None = await conn.fetchval(
        "SELECT data FROM file_chunks WHERE file_id = $1 AND seq = $2", file_id, seq
    )
    return data


async def lock_for_user(
    conn: asyncpg.Connection, file_id: uuid.UUID, user_id: uuid.UUID, *, share: bool
) -> RowLike | None:
    """The user's unexpired file, locked for this transaction: FOR SHARE while a batch is created on it, FOR
    UPDATE to delete it, so a batch is never created on a file being deleted (nor the sweep's expired ones)."""
    lock = "FOR SHARE" if share else "FOR UPDATE"
    row: RowLike | None = await conn.fetchrow(
        f"SELECT * FROM files WHERE id = $1 AND user_id = $2 AND {_LIVE} {lock}",  # noqa: S608 - fixed clauses
        file_id,
        user_id,
    )
    return row


async def in_live_batch(conn: asyncpg.Connection, file_id: uuid.UUID, live_statuses: list[str]) -> bool:
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM batches WHERE input_file_id = $1 AND status = ANY($2::text[]))",
        file_id,
        live_statuses,
    )
    return found


async def delete(conn: asyncpg.Connection, file_id: uuid.UUID) -> None:
    """The file and its chunks (batches that wrote it keep its id as null)."""
    await conn.execute("DELETE FROM files WHERE id = $1", file_id)


async def list_for_user(
    conn: asyncpg.Connection, user_id: uuid.UUID, *, purpose: str | None, after: uuid.UUID | None, limit: int
) -> list[RowLike]:
    """The user's unexpired files, newest first; `after` is the last file id of the previous page (which may
    have expired since: it still marks the place)."""
    rows = await conn.fetch(
        "SELECT f.* FROM files f WHERE f.user_id = $1 AND ($2::text IS NULL OR f.purpose = $2) "
        "AND (f.expires_at IS NULL OR f.expires_at > now()) "
        "AND ($3::uuid IS NULL OR (f.created_at, f.id) < "
        "(SELECT a.created_at, a.id FROM files a WHERE a.id = $3 AND a.user_id = $1)) "
        "ORDER BY f.created_at DESC, f.id DESC LIMIT $4",
        user_id,
        purpose,
        after,
        limit,
    )
    return list(rows)


async def lock_expired(conn: asyncpg.Connection, live_statuses: list[str], limit: int) -> list[uuid.UUID]:
    """Up to `limit` expired files no live batch reads, oldest expiry first, locked FOR UPDATE for this
    transaction (SKIP LOCKED: a file another worker is deleting, or a batch is being created on, is left)."""
    rows = await conn.fetch(
        "SELECT f.id FROM files f WHERE f.expires_at <= now() AND NOT EXISTS "
        "(SELECT 1 FROM batches b WHERE b.input_file_id = f.id AND b.status = ANY($1::text[])) "
        "ORDER BY f.expires_at LIMIT $2 FOR UPDATE OF f SKIP LOCKED",
        live_statuses,
        limit,
    )
    return [r["id"] for r in rows]


async def delete_unread(conn: asyncpg.Connection, file_ids: list[uuid.UUID], live_statuses: list[str]) -> int:
    """Delete the given (locked) files but any a live batch reads, checked again on this statement's fresher
    snapshot: a batch created on one after `lock_expired`'s snapshot but before its lock is seen here.
    Returns how many went."""
    status: str = await conn.execute(
        "DELETE FROM files f WHERE f.id = ANY($1::uuid[]) AND NOT EXISTS "
        "(SELECT 1 FROM batches b WHERE b.input_file_id = f.id AND b.status = ANY($2::text[]))",
        file_ids,
        live_statuses,
    )
    return int(status.rsplit(" ", 1)[-1])
