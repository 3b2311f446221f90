"""Following a query's events: what the SSE endpoint (and anything else that streams) is built on.

`follow` yields every event after a sequence number until the terminal one. Between reads it waits on the
wake-up (`shared/wakeup.py`), not on PostgreSQL. The row is read only when the log cannot answer: when it is
gone (expired, or lost with a Redis restart) or went back below the reader's position; if the row is then
terminal, its stored answer is replayed as one `delta` (flagged `"replayed": true`: a client that already
holds part of the text replaces it) and the terminal event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import asyncpg
from redis.exceptions import RedisError

from shared.errors import NotFound
from shared.events import FOLLOW_MARK_SECONDS, Event, EventLog, EventType
from shared.models import TERMINAL_STATUSES, QueryStatus
from shared.repositories import queries_asyncpg
from shared.repositories.queries_common import RowLike
from shared.wakeup import Wakeup

# A stream that heard nothing for this long looks at its log and, if nothing moved, at the row: an end whose
# append failed (Redis blip) is then found. While the wake-up is disconnected, WAKEUP_FALLBACK_SECONDS.
IDLE_REREAD_SECONDS = 30.0
READ_BATCH = 1000
# A follower renews its mark on the first read after this; the mark stands FOLLOW_MARK_SECONDS, longer than
# this plus the longest wait between two reads.
MARK_RENEW_SECONDS = FOLLOW_MARK_SECONDS / 3


async def ensure_owner(pool: asyncpg.Pool, user_id: uuid.UUID, query_id: uuid.UUID) -> RowLike:
    """The caller's query row, or 404 for a missing one and anybody else's alike (one short read)."""
    async with pool.acquire() as conn:
        row = await queries_asyncpg.fetch_for_user(conn, query_id, user_id)
    if row is None:
        raise NotFound("Query not found", code="query_not_found")
    return row


def terminal_data(row: RowLike) -> tuple[EventType, dict[str, Any]]:
    """The terminal event a finished row stands for, with its fields."""
    status = QueryStatus(row["status"])
    if status is QueryStatus.COMPLETED:
        return EventType.COMPLETED, {
            "usage": {
                "prompt_tokens": row["prompt_tokens"],
                "completion_tokens": row["completion_tokens"],
                "total_tokens": row["total_tokens"],
            },
            "cached": bool(_get(row, "cached", False)),
        }
    if status is QueryStatus.FAILED:
        return EventType.FAILED, {"code": row["error_code"], "message": row["error_message"] or ""}
    return EventType.CANCELLED, {}


def _get(row: RowLike, key: str, default: Any) -> Any:
    try:
        return row[key]
    except (KeyError, IndexError):
        return default


def replay(row: RowLike, after: int) -> list[Event]:
    """A terminal row told as events numbered after `after`: its answer as one delta, then its end."""
    attempt = row["attempts"] or None
    events: list[Event] = []
    seq = after
    if row["response"]:
        seq += 1
        events.append(Event(seq, EventType.DELTA, attempt, {"text": row["response"], "replayed": True}))
    type_, data = terminal_data(row)
    events.append(Event(seq + 1, type_, attempt, {**data, "replayed": True}))
    return events


async def _fetch(pool: asyncpg.Pool, query_id: uuid.UUID) -> RowLike | None:
    async with pool.acquire() as conn:
        return await queries_asyncpg.fetch_any(conn, query_id)


async def follow(
    log: EventLog, wakeup: Wakeup, pool: asyncpg.Pool, query_id: uuid.UUID, after: int = 0
) -> AsyncIterator[Event]:
    """Every event of the query after `after`, in order, until the terminal one (the caller checked the owner).

    Holds no database connection while it waits. With Redis unreachable it goes on from the row: it ends with
    the replay once the row is terminal, re-reading every WAKEUP_FALLBACK_SECONDS until then.
    """
    last = max(after, 0)
    woken = True
    # When this follower last marked the query (wake-up generation, clock): events other than the end send
    # their notices only while the mark stands (shared/events.py).
    marked: tuple[int, float] | None = None

    def mark_due() -> bool:
        return marked is None or marked[0] != wakeup.generation or time.monotonic() - marked[1] > MARK_RENEW_SECONDS

    with wakeup.watch(query_id) as waiter:
        if last:
            # A client resuming after the terminal event has nothing more to wait for.
            with contextlib.suppress(RedisError, OSError):
                batch = await log.since(query_id, last - 1, count=1)
                if batch and batch[0].seq == last and batch[0].terminal:
                    return
        while True:
            log_ok = True
            head = None
            try:
                mark, generation, now = mark_due(), wakeup.generation, time.monotonic()
                batch = await log.since(query_id, last, count=READ_BATCH, mark=mark)
                if mark:
                    marked = (generation, now)
                if not batch:
                    head = await log.last_seq(query_id)
            except (RedisError, OSError):
                batch, log_ok = [], False
            gap = False
            for event in batch:
                if event.seq != last + 1 and event.type is not EventType.QUEUED:
                    # Not the next one, and not a story (re)starting: the log was lost and began again
                    # (shared/events.py numbers such a log from the clock). Its events are not ours to tell.
                    gap = True
                    break
                yield event
                last = event.seq
                if event.terminal:
                    return
            if len(batch) == READ_BATCH and not gap:
                continue
            # Nothing new: the query has not moved, or the log cannot answer (gone, restarted below this reader
            # by a Redis that lost it, began again after such a loss, unreachable), or an end was not appended.
            # The row is read in those cases, or after a wait that no notice ended; never on an ordinary wake-up.
            if gap or (not batch and (not log_ok or not woken or head is None or head == 0 or head < last)):
                row = await _fetch(pool, query_id)
                if row is None:
                    return
                if row["status"] in TERMINAL_STATUSES:
                    for event in replay(row, last):
                        yield event
                    return
            idle = wakeup.timeout(IDLE_REREAD_SECONDS) if log_ok else wakeup.fallback_seconds
            woken = await waiter.wait(idle)


async def with_keepalive(events: AsyncIterator[Event], interval: float) -> AsyncGenerator[Event | None]:
    """The events, with a None whenever `interval` passed without one (time for a keep-alive).

    One task reads `events` for the whole stream and hands each one over through a one-slot queue (so it reads
    at most one event ahead): a task and an `asyncio.wait` per event cost more than the event's own work.
    """
    handover: asyncio.Queue[tuple[Event | None, Exception | None]] = asyncio.Queue(maxsize=1)

    async def read() -> None:
        try:
            async for event in events:
                await handover.put((event, None))
        except Exception as exc:  # noqa: BLE001 - raised again on the reading side
            await handover.put((None, exc))
            return
        await handover.put((None, None))

    reader = asyncio.ensure_future(read())
    try:
        while True:
            try:
                async with asyncio.timeout(interval):
                    event, error = await handover.get()
            except TimeoutError:
                yield None
                continue
            if error is not None:
                raise error
            if event is None:
                return
            yield event
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


def end_event(
    status: QueryStatus | None,
    *,
    usage: dict[str, Any] | None = None,
    code: str | None = None,
    message: str | None = None,
    delay_s: float | None = None,
    retry_after_s: float | None = None,
) -> tuple[EventType, dict[str, Any]] | None:
    """The event (type and data) for the status an outcome write left; None when there is none (the write was
    discarded, or the query was handed back without a delay)."""
    if status is QueryStatus.COMPLETED:
        return EventType.COMPLETED, {"usage": usage, "cached": False}
    if status is QueryStatus.FAILED:
        return EventType.FAILED, {"code": code, "message": message or ""}
    if status is QueryStatus.CANCELLED:
        return EventType.CANCELLED, {}
    if status is QueryStatus.PENDING and delay_s is not None:
        return EventType.RETRY_SCHEDULED, {"code": code, "delay_s": round(delay_s, 3), "retry_after_s": retry_after_s}
    return None


async def tell_end(
    events: EventLog,
    query_id: uuid.UUID,
    status: QueryStatus | None,
    attempt: int | None,
    *,
    code: str | None = None,
    message: str | None = None,
) -> None:
    """Append the event for the status a write left (the sweeper's `worker_lost`); nothing when there is none.
    The worker's own outcome writes send theirs in one batch with the rest of the query's end
    (worker/processing.py `_end`)."""
    event = end_event(status, code=code, message=message)
    if event is not None:
        await events.append_quietly(query_id, event[0], event[1], attempt)
