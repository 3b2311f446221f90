"""What an attempt tells its query's event log: its start, its text as it streams in, and how it ended.

Deltas are coalesced: the first piece goes out at once (time to first token) while the stream goes on, later
ones at most every EVENT_FLUSH_MS, each batch one append (one EVALSHA: XADD + PUBLISH). Once the stream has
ended nothing more goes out on its own: what is still buffered rides in the round trip of the attempt's end,
ahead of its event (`worker/processing.py` `_end`). A short answer that arrives in one read with its
end-of-stream thus costs no append of its own. Appends never fail the query: the row is the truth and a reader
replays it when the log is missing (`shared/services/events.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from shared.events import EventLog, EventType
from shared.metrics import TIME_TO_FIRST_TOKEN
from shared.repositories.queries_asyncpg import Claim
from shared.scriptbatch import ScriptBatch


class DeltaSink:
    """One attempt's events before its end: `started` (and `attempt_restarted`), then its streamed pieces
    appended in batches, in order, from one task.

    The call reports its pieces (`push`) and the end of its stream (`end`). `close()` stops the writer before
    the attempt's end; what it had not sent then goes with the end's event (`rest_in`) or, when no end is
    told, alone (`flush`): either way every delta is in the log before the event that ends the attempt."""

    def __init__(self, events: EventLog, claim: Claim, interval_s: float) -> None:
        # The attempt's opening events go out while the call starts, not before it; deltas wait for them.
        self._opening = asyncio.ensure_future(tell_start(events, claim))
        self._events = events
        self._query_id = claim.query_id
        self._attempt = claim.attempt
        self._model = claim.model
        self._interval = interval_s
        self._parts: list[str] = []
        # A piece came, or the writer is to stop.
        self._ready = asyncio.Event()
        # The stream ended or the attempt is closing: the writer sends nothing more.
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = time.perf_counter()

    def push(self, text: str) -> None:
        """A piece of the answer (called by the streaming call, on the loop)."""
        if not text:
            return
        if self._task is None:
            TIME_TO_FIRST_TOKEN.labels(model=self._model).observe(time.perf_counter() - self._started)
            # The writer runs once this loop turn is over: when the read that brought this piece also brought
            # the end of the stream, `end()` has been called by then and the piece waits for the attempt's end.
            self._task = asyncio.create_task(self._run())
        self._parts.append(text)
        self._ready.set()

    def end(self) -> None:
        """The stream has ended (called by the call, on the loop, as it reads the end): what is buffered now
        waits for the attempt's end, which is a round trip anyway."""
        self._stopped.set()
        self._ready.set()

    async def _run(self) -> None:
        await self._opening
        while not self._stopped.is_set():
            if not self._parts:
                await self._ready.wait()
                self._ready.clear()
                continue
            await self._events.append_quietly(self._query_id, EventType.DELTA, self._take(), self._attempt)
            if self._interval:
                # The coalescing pause; the stream's end (or `close()`) cuts it short.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._stopped.wait()

    async def close(self) -> None:
        """Stop the writer: after this the opening events and every batch it sent are in the log, and what it
        had not sent waits for `rest_in` or `flush`."""
        self.end()
        await asyncio.shield(self._opening if self._task is None else self._task)

    def rest_in(self, batch: ScriptBatch, *, notify: bool) -> int | None:
        """Queue what `close()` left as one delta append on the attempt's end batch; the index of its result,
        None when nothing was left. `notify=False` when the end's event follows in the same batch: its notice
        wakes the readers for both."""
        if not self._parts:
            return None
        return self._events.append_in(
            batch, self._query_id, EventType.DELTA, self._take(), self._attempt, notify=notify
        )

    async def flush(self) -> None:
        """Append what no end took (`rest_in`), alone; nothing when it was taken."""
        if self._parts:
            append = self._events.append_quietly(self._query_id, EventType.DELTA, self._take(), self._attempt)
            await asyncio.shield(append)

    def _take(self) -> dict[str, str]:
        """The buffered pieces as one delta's data; the buffer is empty after."""
        text = "".join(self._parts)
        self._parts.clear()
        return {"text": text}


async def tell_start(events: EventLog, claim: Claim) -> None:
    """`attempt_restarted` (a later attempt: drop the earlier one's text), then `started`."""
    if claim.attempt > 1:
        await events.append_quietly(
            claim.query_id, EventType.ATTEMPT_RESTARTED, {"previous_attempt": claim.attempt - 1}, claim.attempt
        )
    await events.append_quietly(claim.query_id, EventType.STARTED, {}, claim.attempt)
