"""Files of the `/v1` door: upload (streamed into 1 MiB chunk rows), metadata and streamed content."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
from pydantic import ValidationError

from shared.config import Settings
from shared.errors import AppError, Conflict, InvalidInput, NotFound
from shared.models import BATCH_LIVE_STATUSES, FILE_CHUNK_BYTES, FilePurpose
from shared.repositories import files as repo
from shared.repositories.queries_common import RowLike
from shared.schemas_openai import ExpiresAfter
from shared.services.responses import list_object, uuid_after

FILE_PREFIX = "file-"


def file_id(raw: uuid.UUID) -> str:
    return f"{FILE_PREFIX}{raw.hex}"


def parse_file_id(public_id: str) -> uuid.UUID:
    """The row id inside `file-<hex>`; anything else is a 404, like a missing file."""
    found = uuid_after(public_id, FILE_PREFIX)
    if found is None:
        raise NotFound(f"No such File object: {public_id[:80]}", code="file_not_found")
    return found


def file_object(row: RowLike) -> dict[str, Any]:
    """A file row as OpenAI's `file` object."""
    return {
        "id": file_id(row["id"]),
        "object": "file",
        "bytes": row["bytes"],
        "created_at": int(row["created_at"].timestamp()),
        "expires_at": int(row["expires_at"].timestamp()) if row["expires_at"] else None,
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
    }


class LineCounter:
    """Counts the non-blank lines of a stream of byte chunks (a line may span chunks)."""

    def __init__(self) -> None:
        self.lines = 0
        self._open_line_has_text = False

    def feed(self, data: bytes) -> None:
        parts = data.split(b"\n")
        for part in parts[:-1]:
            if self._open_line_has_text or part.strip():
                self.lines += 1
            self._open_line_has_text = False
        self._open_line_has_text = self._open_line_has_text or bool(parts[-1].strip())

    def close(self) -> int:
        if self._open_line_has_text:
            self.lines += 1
            self._open_line_has_text = False
        return self.lines


def expires_after_seconds(anchor: str | None, seconds: str | None) -> int | None:
    """The seconds of an upload's `expires_after` (multipart `expires_after[anchor]`, `expires_after[seconds]`),
    checked by the model a batch's `output_expires_after` is; None when it is not given, a 400 when invalid."""
    if anchor is None and seconds is None:
        return None
    try:
        return ExpiresAfter.model_validate({"anchor": anchor, "seconds": seconds}).seconds
    except ValidationError as exc:
        details = [
            {"loc": ["body", "expires_after", *map(str, e["loc"])], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors()
        ]
        raise InvalidInput("Invalid 'expires_after'", code="invalid_value", details=details) from exc


def _check_filename(filename: str) -> str:
    name = filename.strip() or "upload.jsonl"
    if "\x00" in name:
        raise InvalidInput("filename must not contain NUL characters", code="invalid_filename")
    return name[:255]


async def upload(
    pool: asyncpg.Pool,
    settings: Settings,
    user_id: uuid.UUID,
    *,
    purpose: str,
    filename: str,
    read: Callable[[int], Awaitable[bytes]],
    expires_seconds: int | None = None,
) -> RowLike:
    """Store an uploaded batch input file chunk by chunk, in one transaction: all of it or nothing. It expires
    `expires_seconds` after its creation (see `expires_after_seconds`), else BATCH_INPUT_EXPIRES_SECONDS after
    it (0: never).

    At most MAX_FILE_BYTES (a 413 otherwise) and MAX_BATCH_LINES non-blank lines (a 400); the lines
    themselves are checked when a batch reads them, each bad one reported in its error file.
    """
    if len(purpose) > 32 or purpose != FilePurpose.BATCH:
        raise InvalidInput(
            "purpose must be 'batch'",
            code="invalid_value",
            details=[{"loc": ["body", "purpose"], "msg": "only 'batch' is supported", "type": "invalid_value"}],
        )
    if expires_seconds is None:
        expires_seconds = settings.batch_input_expires_seconds or None
    new_id, counter, size, seq = uuid.uuid4(), LineCounter(), 0, 0
    async with pool.acquire() as conn, conn.transaction():
        await repo.insert(
            conn,
            file_id=new_id,
            user_id=user_id,
            purpose=purpose,
            filename=_check_filename(filename),
            expires_seconds=expires_seconds,
        )
        while data := await read(FILE_CHUNK_BYTES):
            size += len(data)
            if size > settings.max_file_bytes:
                raise AppError(
                    f"File is larger than {settings.max_file_bytes} bytes", status_code=413, code="file_too_large"
                )
            counter.feed(data)
            if counter.lines > settings.max_batch_lines:
                raise _too_many_lines(settings)
            await repo.add_chunk(conn, new_id, seq, data)
            seq += 1
        lines = counter.close()
        if lines > settings.max_batch_lines:
            raise _too_many_lines(settings)
        if lines == 0:
            raise InvalidInput("The file is empty: a batch file has one JSON request per line", code="empty_file")
        return await repo.finish(conn, new_id, size, lines)


def _too_many_lines(settings: Settings) -> InvalidInput:
    return InvalidInput(f"A batch file has at most {settings.max_batch_lines} lines", code="too_many_lines")


async def get_file(conn: asyncpg.Connection, user_id: uuid.UUID, public_id: str) -> RowLike:
    row = await repo.get_for_user(conn, parse_file_id(public_id), user_id)
    if row is None:
        raise NotFound(f"No such File object: {public_id[:80]}", code="file_not_found")
    return row


async def lock_file(conn: asyncpg.Connection, user_id: uuid.UUID, public_id: str) -> RowLike:
    """The caller's file, share-locked for the caller's transaction (a batch being created on it)."""
    row = await repo.lock_for_user(conn, parse_file_id(public_id), user_id, share=True)
    if row is None:
        raise NotFound(f"No such File object: {public_id[:80]}", code="file_not_found")
    return row


async def delete_file(conn: asyncpg.Connection, user_id: uuid.UUID, public_id: str) -> dict[str, Any]:
    """Delete one of the caller's files; one that a live batch reads is a 409 until the batch ends."""
    raw = parse_file_id(public_id)
    async with conn.transaction():
        if await repo.lock_for_user(conn, raw, user_id, share=False) is None:
            raise NotFound(f"No such File object: {public_id[:80]}", code="file_not_found")
        if await repo.in_live_batch(conn, raw, [s.value for s in BATCH_LIVE_STATUSES]):
            raise Conflict("A batch that is still running reads this file", code="file_in_use")
        await repo.delete(conn, raw)
    return {"id": public_id, "object": "file", "deleted": True}


async def list_page(
    conn: asyncpg.Connection, user_id: uuid.UUID, *, purpose: str | None, after: str | None, limit: int
) -> dict[str, Any]:
    """OpenAI's cursor list of the caller's files, newest first."""
    after_id = parse_file_id(after) if after else None
    rows = await repo.list_for_user(conn, user_id, purpose=purpose, after=after_id, limit=limit + 1)
    return list_object(rows, limit, file_object)


async def content(pool: asyncpg.Pool, file_row: RowLike) -> AsyncIterator[bytes]:
    """The file's bytes, one chunk at a time; a connection is held only while one chunk is read."""
    seq = 0
    while True:
        async with pool.acquire() as conn:
            data = await repo.chunk(conn, file_row["id"], seq)
        if data is None:
            return
        yield data
        seq += 1


class ChunkWriter:
    """Writes a file's content as 1 MiB chunk rows on the caller's connection (inside its transaction)."""

    def __init__(self, conn: asyncpg.Connection, new_id: uuid.UUID) -> None:
        self.conn, self.id = conn, new_id
        self._buffer = bytearray()
        self._seq = 0
        self.size = 0
        self.lines = 0

    async def write_line(self, line: bytes) -> None:
        self._buffer += line + b"\n"
        self.size += len(line) + 1
        self.lines += 1
        if len(self._buffer) >= FILE_CHUNK_BYTES:
            await self._flush(FILE_CHUNK_BYTES)

    async def _flush(self, upto: int) -> None:
        while len(self._buffer) >= upto and self._buffer:
            piece = bytes(self._buffer[:FILE_CHUNK_BYTES])
            del self._buffer[:FILE_CHUNK_BYTES]
            await repo.add_chunk(self.conn, self.id, self._seq, piece)
            self._seq += 1

    async def close(self) -> uuid.UUID | None:
        """Finish the file; one without a line is not kept (OpenAI leaves out a file that would be empty):
        returns its id, or None then."""
        if not self.lines:
            await repo.delete(self.conn, self.id)
            return None
        await self._flush(1)
        await repo.finish(self.conn, self.id, self.size, self.lines)
        return self.id


async def open_output(
    conn: asyncpg.Connection, user_id: uuid.UUID, filename: str, expires_seconds: int | None
) -> ChunkWriter:
    """A new `batch_output` file of the user (expiring `expires_seconds` after now, or never), written by the
    returned writer."""
    new_id = uuid.uuid4()
    await repo.insert(
        conn,
        file_id=new_id,
        user_id=user_id,
        purpose=FilePurpose.BATCH_OUTPUT,
        filename=filename,
        expires_seconds=expires_seconds,
    )
    return ChunkWriter(conn, new_id)


async def delete_expired(pool: asyncpg.Pool, limit: int) -> int:
    """Delete up to `limit` expired files (with their chunks) in one transaction; returns how many went.

    An expired file reads as missing already; one a live batch still reads stays until the batch ends, as a
    client's delete would wait (409) for it.
    """
    live = [s.value for s in BATCH_LIVE_STATUSES]
    async with pool.acquire() as conn, conn.transaction():
        found = await repo.lock_expired(conn, live, limit)
        return await repo.delete_unread(conn, found, live) if found else 0


async def iter_lines(
    conn: asyncpg.Connection, file_uuid: uuid.UUID, chunk: int, offset: int, max_line_bytes: int
) -> AsyncIterator[tuple[bytes | None, int, int]]:
    """The file's non-blank lines from (chunk, offset), each with the position just after it.

    A line longer than `max_line_bytes` comes out as None (it is not held in memory).
    """
    carry = bytearray()
    too_long = False
    seq, start = chunk, offset
    data = await repo.chunk(conn, file_uuid, seq)
    while True:
        if data is None:
            if carry.strip() or too_long:
                yield (None if too_long else bytes(carry)), seq, 0
            return
        idx = data.find(b"\n", start)
        if idx < 0:
            if not too_long:
                carry += data[start:]
                too_long = len(carry) > max_line_bytes
                if too_long:
                    carry.clear()
            seq, start = seq + 1, 0
            data = await repo.chunk(conn, file_uuid, seq)
            continue
        if not too_long:
            carry += data[start:idx]
            too_long = len(carry) > max_line_bytes
        line = None if too_long else bytes(carry)
        start = idx + 1
        position = (seq, start) if start < len(data) else (seq + 1, 0)
        if line is None or line.strip():
            yield line, *position
        carry.clear()
        too_long = False
        if position[0] != seq:
            seq, start = position
            data = await repo.chunk(conn, file_uuid, seq)
