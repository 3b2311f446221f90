"""SQL of files: a row per file, its content as ordered 1 MiB `bytea` chunks (raw asyncpg)."""

from __future__ import annotations

import uuid

import asyncpg

from shared.repositories.queries_common import RowLike


async def insert(
    conn: asyncpg.Connection, *, file_id: uuid.UUID, user_id: uuid.UUID, purpose: str, filename: str
) -> None:
    """The file's row, empty until `finish` records its size (in the same transaction as its chunks)."""
    await conn.execute(
        "INSERT INTO files (id, user_id, purpose, filename, bytes, line_count) VALUES ($1, $2, $3, $4, 0, 0)",
        file_id,
        user_id,
        purpose,
        filename,
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
    """The file if it belongs to the user; anybody else's is indistinguishable from a missing one."""
    row: RowLike | None = await conn.fetchrow("SELECT * FROM files WHERE id = $1 AND user_id = $2", file_id, user_id)
    return row


async def chunk(conn: asyncpg.Connection, file_id: uuid.UUID, seq: int) -> bytes | None:
    """One chunk of a file's content, or None past its end."""
    data: bytes | None = await conn.fetchval(
        "SELECT data FROM file_chunks WHERE file_id = $1 AND seq = $2", file_id, seq
    )
    return data
