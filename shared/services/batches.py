"""Batches of the `/v1` door: each line of the input file becomes an ordinary query, under the same limits.

A batch moves in steps, each one transaction on the locked batch row (`advance`, run by the worker's
`batches.advance` task and, for a lost message, the sweeper):
- validating/in_progress: read up to EXPAND_LINES more lines; a good line becomes a pending query (limits
  taken like any submit: a refusal pauses the batch until Retry-After, never fails it), a bad line an error
  item; the queries are published after the commit.
- every step: count completed/failed/live lines into `request_counts`.
- cancelling (or past `expires_at`): cancel the live queries, EXPAND_LINES at a time.
- all lines read and none live: finalizing, then the output and error files (lines in input order, matched
  by `custom_id`) and the final status: completed, cancelled or expired.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from pydantic import ValidationError

from shared.config import Settings
from shared.errors import AppError, Conflict, NotFound
from shared.events import EventLog, EventType
from shared.limits import Limiter, LimitExceeded
from shared.models import BatchStatus, FilePurpose, QueryPriority, QueryStatus
from shared.queue import BATCH_TASK, Publisher
from shared.repositories import batches as repo
from shared.repositories.queries_common import RowLike
from shared.schemas import QueryCreate
from shared.schemas_openai import BatchCreate, ChatCompletionCreate, ResponseCreate
from shared.services import files as files_service
from shared.services import queries as queries_service
from shared.services import responses as responses_service
from shared.services import webhooks

log = logging.getLogger(__name__)
BATCH_PREFIX = "batch_"
# Lines read (or queries cancelled) per step: one transaction, a few hundred milliseconds.
EXPAND_LINES = 500
# How often a batch whose queries are running looks again.
POLL_SECONDS = 2.0
# A live batch whose next step is this overdue has lost its task message: the sweeper sends another.
OVERDUE_SECONDS = 30.0
# Items read per query while writing the output files.
OUTPUT_PAGE = 1000
COMPLETION_WINDOW = timedelta(hours=24)


def batch_id(raw: uuid.UUID) -> str:
    return f"{BATCH_PREFIX}{raw.hex}"


def parse_batch_id(public_id: str) -> uuid.UUID:
    found = responses_service.uuid_after(public_id, BATCH_PREFIX)
    if found is None:
        raise NotFound(f"No batch found with id '{public_id[:80]}'", code="batch_not_found")
    return found


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def batch_object(row: RowLike) -> dict[str, Any]:
    """A batch row as OpenAI's `batch` object."""
    return {
        "id": batch_id(row["id"]),
        "object": "batch",
        "endpoint": row["endpoint"],
        "errors": {"object": "list", "data": row["errors"]} if row["errors"] else None,
        "input_file_id": files_service.file_id(row["input_file_id"]),
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": files_service.file_id(row["output_file_id"]) if row["output_file_id"] else None,
        "error_file_id": files_service.file_id(row["error_file_id"]) if row["error_file_id"] else None,
        "created_at": _ts(row["created_at"]),
        "in_progress_at": _ts(row["in_progress_at"]),
        "expires_at": _ts(row["expires_at"]),
        "finalizing_at": _ts(row["finalizing_at"]),
        "completed_at": _ts(row["completed_at"]),
        "failed_at": _ts(row["failed_at"]),
        "expired_at": _ts(row["expired_at"]),
        "cancelling_at": _ts(row["cancelling_at"]),
        "cancelled_at": _ts(row["cancelled_at"]),
        "request_counts": {
            "total": row["request_total"],
            "completed": row["request_completed"],
            "failed": row["request_failed"],
        },
        "metadata": row["metadata"],
    }


async def create(conn: asyncpg.Connection, user_id: uuid.UUID, body: BatchCreate) -> RowLike:
    """A validating batch over one of the caller's `batch` files; the caller sends `batches.advance`."""
    async with conn.transaction():
        return await _create(conn, user_id, body)


async def _create(conn: asyncpg.Connection, user_id: uuid.UUID, body: BatchCreate) -> RowLike:
    # FOR SHARE: a concurrent delete of the file waits for this batch, then refuses (the batch is live).
    file_row = await files_service.lock_file(conn, user_id, body.input_file_id)
    if file_row["purpose"] != FilePurpose.BATCH:
        raise AppError(
            "input_file_id must be a file uploaded with purpose 'batch'", status_code=400, code="invalid_input_file"
        )
    now = datetime.now(UTC)
    return await repo.insert(
        conn,
        id=uuid.uuid4(),
        user_id=user_id,
        input_file_id=file_row["id"],
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        status=BatchStatus.VALIDATING.value,
        metadata=body.metadata,
        request_total=file_row["line_count"],
        created_at=now,
        updated_at=now,
        output_expires_seconds=body.output_expires_after.seconds if body.output_expires_after else None,
        next_check_at=now + timedelta(seconds=OVERDUE_SECONDS),
        expires_at=now + COMPLETION_WINDOW,
    )


async def get(conn: asyncpg.Connection, user_id: uuid.UUID, public_id: str) -> RowLike:
    row = await repo.get_for_user(conn, parse_batch_id(public_id), user_id)
    if row is None:
        raise NotFound(f"No batch found with id '{public_id[:80]}'", code="batch_not_found")
    return row


async def list_page(conn: asyncpg.Connection, user_id: uuid.UUID, after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor list: newest first, `after` the last id of the previous page."""
    after_id = parse_batch_id(after) if after else None
    rows = await repo.list_for_user(conn, user_id, after=after_id, limit=limit + 1)
    return responses_service.list_object(rows, limit, batch_object)


async def cancel(conn: asyncpg.Connection, user_id: uuid.UUID, public_id: str) -> tuple[RowLike, bool]:
    """validating/in_progress → cancelling (True: the caller sends `batches.advance`); a batch already cancelling
    or cancelled is returned as it is; a finished one is a 409."""
    raw = parse_batch_id(public_id)
    row = await repo.request_cancel(conn, raw, user_id)
    if row is not None:
        return row, True
    row = await get(conn, user_id, public_id)
    if row["status"] in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
        return row, False
    raise Conflict(f"Cannot cancel a batch with status {row['status']}", code="batch_not_cancellable")


class _BadLine(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _as_batch_work(request: QueryCreate) -> QueryCreate:
    """Batch lines run at batch priority: only on the upstream budget interactive work leaves (aged, never starved)."""
    return request.model_copy(update={"priority": QueryPriority.BATCH.value})


def _line_request(raw: bytes | None, endpoint: str, max_line_bytes: int) -> tuple[str | None, QueryCreate | _BadLine]:
    """A line's `custom_id` and its query, or why the line is refused."""
    if raw is None:
        return None, _BadLine("line_too_long", f"The line is longer than {max_line_bytes} bytes")
    try:
        line = json.loads(raw)
    except (ValueError, RecursionError):
        return None, _BadLine("invalid_json", "The line is not valid JSON")
    if not isinstance(line, dict):
        return None, _BadLine("invalid_request", "The line must be a JSON object")
    custom_id = line.get("custom_id")
    custom_id = custom_id if isinstance(custom_id, str) and "\x00" not in custom_id else None
    if custom_id is None or not custom_id.strip() or len(custom_id) > 512:
        return None, _BadLine("invalid_custom_id", "custom_id must be a non-empty string of at most 512 characters")
    if line.get("method") != "POST":
        return custom_id, _BadLine("invalid_method", "method must be POST")
    if line.get("url") != endpoint:
        return custom_id, _BadLine("mismatched_url", f"url must be the batch's endpoint {endpoint}")
    body = line.get("body")
    if not isinstance(body, dict):
        return custom_id, _BadLine("invalid_body", "body must be a JSON object")
    try:
        if endpoint == "/v1/chat/completions":
            chat = ChatCompletionCreate.model_validate(body)
            if chat.stream:
                return custom_id, _BadLine("invalid_body", "stream is not supported in a batch")
            return custom_id, _as_batch_work(responses_service.query_from_chat(chat))
        response = ResponseCreate.model_validate({k: v for k, v in body.items() if k != "background"})
        if response.stream:
            return custom_id, _BadLine("invalid_body", "stream is not supported in a batch")
        return custom_id, _as_batch_work(responses_service.query_from_response(response))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return custom_id, _BadLine("invalid_body", f"body.{where}: {first['msg']}")
    except AppError as exc:
        return custom_id, _BadLine(exc.code, exc.message)


def _retry_after(exc: AppError) -> float:
    try:
        return float((exc.headers or {}).get("Retry-After", "2"))
    except ValueError:
        return 2.0


LineItem = tuple[int, str | None, uuid.UUID | None, str | None, str | None]
TakeLine = Callable[[int, str | None, QueryCreate | _BadLine], Awaitable[LineItem | None]]


async def _read_lines(conn: asyncpg.Connection, settings: Settings, batch: RowLike, take: TakeLine) -> None:
    """Read up to EXPAND_LINES more input lines from where the batch stopped, each made an item by `take` (None:
    stop before this line and read it again next step); record the items, the position and whether input is done."""
    items: list[LineItem] = []
    position = (batch["read_chunk"], batch["read_offset"])
    line_no, done = batch["lines_read"], True
    max_line = settings.max_query_chars * 8 + 64 * 1024
    async for raw, chunk, offset in files_service.iter_lines(
        conn, batch["input_file_id"], batch["read_chunk"], batch["read_offset"], max_line
    ):
        if len(items) >= EXPAND_LINES:
            done = False
            break
        custom_id, request = _line_request(raw, batch["endpoint"], max_line)
        item = await take(line_no, custom_id, request)
        if item is None:
            done = False
            break
        items.append(item)
        line_no += 1
        position = (chunk, offset)
    if items:
        await repo.add_items(conn, batch["id"], items)
    await repo.update(
        conn, batch["id"], read_chunk=position[0], read_offset=position[1], lines_read=line_no, input_done=done
    )


async def _expand(
    conn: asyncpg.Connection, settings: Settings, limiter: Limiter, batch: RowLike, taken: list[uuid.UUID]
) -> float:
    """Read more lines into queries and error items; the delay before the next step."""
    delay = 0.0

    async def take(line_no: int, custom_id: str | None, request: QueryCreate | _BadLine) -> LineItem | None:
        nonlocal delay
        if isinstance(request, _BadLine):
            return (line_no, custom_id, None, request.code, request.message)
        try:
            # Refused lines are checked here as the native submit checks them (model, sizes, NUL).
            accepted = await queries_service.submit_query_in(conn, settings, limiter, batch["user_id"], request)
        except LimitExceeded as exc:
            # The user's limits hold for batches too: wait for them, then go on from this line.
            delay = _retry_after(exc)
            return None
        except AppError as exc:
            if exc.status_code >= 500:
                delay = _retry_after(exc)
                return None
            return (line_no, custom_id, None, exc.code, exc.message)
        taken.append(accepted.query_id)
        return (line_no, custom_id, accepted.query_id, None, None)

    await _read_lines(conn, settings, batch, take)
    return delay


async def _report_unread(conn: asyncpg.Connection, settings: Settings, batch: RowLike, status: BatchStatus) -> None:
    """A batch ending before its input was all read: more unread lines go to the error file, each with its
    `custom_id` and why it never ran (as OpenAI reports a batch's unfinished requests)."""
    code, message = (
        ("batch_cancelled", "The batch was cancelled before this request ran")
        if status == BatchStatus.CANCELLING
        else ("batch_expired", "The batch expired before this request ran")
    )

    async def take(line_no: int, custom_id: str | None, request: QueryCreate | _BadLine) -> LineItem:
        if isinstance(request, _BadLine):
            return (line_no, custom_id, None, request.code, request.message)
        return (line_no, custom_id, None, code, message)

    await _read_lines(conn, settings, batch, take)


async def _cancel_live(
    conn: asyncpg.Connection, limiter: Limiter, events: EventLog, batch: RowLike, ended: list[uuid.UUID]
) -> None:
    """Cancel the batch's live queries: pending ones end now (`ended`), running ones when their worker stops."""
    for query_id in await repo.live_query_ids(conn, batch["id"], EXPAND_LINES):
        # One that ended meanwhile needs nothing.
        with contextlib.suppress(Conflict, NotFound):
            row = await queries_service.cancel_query(conn, limiter, batch["user_id"], query_id, events=events)
            if row["status"] == QueryStatus.CANCELLED:
                ended.append(query_id)


def _status_code(query: RowLike) -> int:
    if query["status"] == QueryStatus.CANCELLED:
        return 499
    return 400 if query["error_code"] == "upstream_bad_request" else 500


def _output_line(batch: RowLike, item: RowLike) -> tuple[bool, dict[str, Any]]:
    """(is it a success, its line in the output or error file)."""
    custom_id = item["item_custom_id"]
    line_id = f"batch_req_{batch['id'].hex[:12]}{item['item_line_no']:08d}"
    if item["item_error_code"] is not None or item["id"] is None:
        code = item["item_error_code"] or "request_deleted"
        message = item["item_error_message"] or "The request's query no longer exists"
        return False, {
            "id": line_id,
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    query = queries_service.to_out(item)
    request_id = query.query_id.hex
    if query.status == QueryStatus.COMPLETED:
        body = (
            responses_service.chat_completion_object(query)
            if batch["endpoint"] == "/v1/chat/completions"
            else responses_service.response_object(query)
        )
        response = {"status_code": 200, "request_id": request_id, "body": body}
        return True, {"id": line_id, "custom_id": custom_id, "response": response, "error": None}
    error = query.error
    code = error.code if error else query.status.value
    message = error.message if error else f"The request was {query.status.value}"
    response = {
        "status_code": _status_code(item),
        "request_id": request_id,
        "body": {"error": {"message": message, "type": "server_error", "param": None, "code": code}},
    }
    return False, {"id": line_id, "custom_id": custom_id, "response": response, "error": None}


async def _finalize(conn: asyncpg.Connection, settings: Settings, batch: RowLike) -> dict[str, Any]:
    """Write the output and error files (input order, expiring as the batch asked, else after
    BATCH_OUTPUT_EXPIRES_SECONDS); the columns to set on the batch."""
    short = batch["id"].hex
    expires = batch["output_expires_seconds"] or settings.batch_output_expires_seconds or None
    output = await files_service.open_output(conn, batch["user_id"], f"batch_{short}_output.jsonl", expires)
    errors = await files_service.open_output(conn, batch["user_id"], f"batch_{short}_error.jsonl", expires)
    after = -1
    while page := await repo.items_page(conn, batch["id"], after, OUTPUT_PAGE):
        for item in page:
            ok, line = _output_line(batch, item)
            await (output if ok else errors).write_line(json.dumps(line, separators=(",", ":")).encode())
        after = page[-1]["item_line_no"]
    return {"output_file_id": await output.close(), "error_file_id": await errors.close()}


async def advance(
    pool: asyncpg.Pool,
    settings: Settings,
    limiter: Limiter,
    publisher: Publisher,
    events: EventLog,
    batch_uuid: uuid.UUID,
) -> float | None:
    """Move the batch one step; the seconds until its next step, or None when it has ended (or is busy)."""
    taken: list[uuid.UUID] = []
    ended: list[uuid.UUID] = []
    try:
        async with pool.acquire() as conn, conn.transaction():
            batch = await repo.lock(conn, batch_uuid)
            if batch is None:
                return None
            delay = await _step(conn, settings, limiter, events, batch, taken, ended)
            if delay is not None:
                await repo.update(
                    conn, batch_uuid, next_check_at=datetime.now(UTC) + timedelta(seconds=delay + OVERDUE_SECONDS)
                )
    except BaseException:
        await queries_service.release_limits(limiter, taken)
        raise
    for query_id in taken:
        # As the native submit: the log's first event, then the publish (a failed one leaves the query
        # pending for the sweeper).
        await events.append_quietly(query_id, EventType.QUEUED)
        await publisher.publish(query_id)
    for query_id in ended:
        # Cancelled here, not by a worker: their webhooks go now, as after the native cancel.
        await webhooks.on_query_ended(pool, publisher, query_id)
    return delay


async def _step(
    conn: asyncpg.Connection,
    settings: Settings,
    limiter: Limiter,
    events: EventLog,
    batch: RowLike,
    taken: list[uuid.UUID],
    ended: list[uuid.UUID],
) -> float | None:
    now = datetime.now(UTC)
    status = BatchStatus(batch["status"])
    if status == BatchStatus.FINALIZING:
        final = (
            BatchStatus.CANCELLED
            if batch["cancelling_at"]
            else BatchStatus.EXPIRED
            if batch["expired_at"]
            else BatchStatus.COMPLETED
        )
        files = await _finalize(conn, settings, batch)
        stamp = {
            BatchStatus.CANCELLED: "cancelled_at",
            BatchStatus.EXPIRED: "expired_at",
            BatchStatus.COMPLETED: "completed_at",
        }
        await repo.update(conn, batch["id"], status=final.value, **files, **{stamp[final]: batch[stamp[final]] or now})
        log.info("batch ended", extra={"outcome": final.value})
        return None
    ending = status == BatchStatus.CANCELLING or batch["expired_at"] is not None
    if not ending and now >= batch["expires_at"]:
        await repo.update(conn, batch["id"], expired_at=now)
        ending = True
    delay = POLL_SECONDS
    if status == BatchStatus.VALIDATING:
        await repo.update(conn, batch["id"], status=BatchStatus.IN_PROGRESS.value, in_progress_at=now)
    if ending:
        await _cancel_live(conn, limiter, events, batch, ended)
        if not batch["input_done"]:
            await _report_unread(
                conn, settings, batch, BatchStatus.CANCELLING if batch["cancelling_at"] else BatchStatus.EXPIRED
            )
    elif not batch["input_done"]:
        delay = await _expand(conn, settings, limiter, batch, taken)
    counts = await repo.counts(conn, batch["id"])
    fresh = await repo.get_for_user(conn, batch["id"], batch["user_id"])
    assert fresh is not None
    await repo.update(conn, batch["id"], request_completed=counts["completed"], request_failed=counts["failed"])
    if fresh["input_done"] and counts["live"] == 0:
        await repo.update(conn, batch["id"], status=BatchStatus.FINALIZING.value, finalizing_at=now)
        return 0.0
    if ending:
        # Unread input is reported at once; running queries end cancelled once their workers notice (a heartbeat).
        return 0.5 if fresh["input_done"] else 0.0
    return delay if not fresh["input_done"] else POLL_SECONDS


async def send_advance(publisher: Publisher, batch_uuid: uuid.UUID) -> None:
    """Wake the batch's next step now (the sweeper sends it later if this message is lost)."""
    await publisher.publish(batch_uuid, task=BATCH_TASK)


async def sweep_overdue(pool: asyncpg.Pool, publisher: Publisher, limit: int) -> int:
    """Send `batches.advance` for live batches whose step is overdue (a lost or never-sent message)."""
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        overdue = await repo.claim_overdue(conn, now, now + timedelta(seconds=OVERDUE_SECONDS), limit)
    for raw in overdue:
        await send_advance(publisher, raw)
    return len(overdue)
