"""What an attempt tells its query's event log: its start, its text as it streams in, and how it ended.

Deltas are coalesced: the first piece goes out at once (time to first token), later ones at most every
EVENT_FLUSH_MS, each batch one append (one EVALSHA: XADD + PUBLISH). Appends never fail the query: the row
is the truth and a reader replays it when the log is missing (`shared/services/events.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from shared.events import EventLog, EventType
from shared.metrics import TIME_TO_FIRST_TOKEN
from shared.repositories.queries_asyncpg import Claim


class DeltaSink:
    """One attempt's events before its end: `started` (and `attempt_restarted`), then its streamed pieces
    appended in batches, in order, from one task. `close()` before the event that ends the attempt."""

    def __init__(self, events: EventLog, claim: Claim, interval_s: float) -> None:
        # The attempt's opening events go out while the call starts, not before it; deltas wait for them.
        self._opening = asyncio.ensure_future(tell_start(events, claim))
        self._events = events
        self._query_id = claim.query_id
        self._attempt = claim.attempt
        self._model = claim.model
        self._interval = interval_s
        self._parts: list[str] = []
        self._ready = asyncio.Event()
        self._closing = False
        self._closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = time.perf_counter()

    def push(self, text: str) -> None:
        """A piece of the answer (called by the streaming call, on the loop)."""
        if not text:
            return
        if self._task is None:
            TIME_TO_FIRST_TOKEN.labels(model=self._model).observe(time.perf_counter() - self._started)
            self._task = asyncio.create_task(self._run())
        self._parts.append(text)
        self._ready.set()

    async def _run(self) -> None:
        await self._opening
        while True:
            if not self._parts and not self._closing:
                await self._ready.wait()
                self._ready.clear()
            if self._parts:
                text = "".join(self._parts)
                self._parts.clear()
                await self._events.append_quietly(self._query_id, EventType.DELTA, {"text": text}, self._attempt)
            if self._closing and not self._parts:
                return
            if not self._closing and self._interval:
                # The coalescing pause; `close()` cuts it short, so the end is not delayed by it.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._closed.wait()

    async def close(self) -> None:
        """Append what is still buffered; after this the attempt's deltas are all in the log."""
        if self._task is None:
            await asyncio.shield(self._opening)
            return
        self._closing = True
        self._ready.set()
        self._closed.set()
        await asyncio.shield(self._task)


async def tell_start(events: EventLog, claim: Claim) -> None:
    """`attempt_restarted` (a later attempt: drop the earlier one's text), then `started`."""
    if claim.attempt > 1:
        await events.append_quietly(
            claim.query_id, EventType.ATTEMPT_RESTARTED, {"previous_attempt": claim.attempt - 1}, claim.attempt
        )
    await events.append_quietly(claim.query_id, EventType.STARTED, {}, claim.attempt)
