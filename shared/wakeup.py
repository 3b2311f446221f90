"""The one wake-up of waiting clients: a Redis subscriber per API process, per-query asyncio waiters.

A query's terminal event, and any other while a stream follows the query, PUBLISHes `<query id> <event type>`
on `aiq:{QUEUE_NAME}:wake` (`shared/events.py`). Each API process runs ONE subscriber task (started in the
lifespan, reached through `api/deps.py`) that wakes the waiters registered for that query: SSE streams and
long-polls alike.

A notice sent while the subscriber is disconnected is lost, so:
- after every (re)subscribe, all waiters are woken once to re-read (and `generation` counts up: followers mark
  their queries again, in case Redis restarted without the marks);
- while disconnected, `timeout()` caps every wait at WAKEUP_FALLBACK_SECONDS: a bounded re-read, never a
  lost answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator

from redis.exceptions import RedisError

from shared.config import Settings
from shared.db import redis_client
from shared.events import TERMINAL_EVENTS, parse_notice, wake_channel

log = logging.getLogger(__name__)
RECONNECT_MAX_SECONDS = 2.0
_TERMINAL_NAMES = frozenset(t.value for t in TERMINAL_EVENTS)


class Waiter:
    """One waiting reader of one query: woken by any event, or only by a terminal one."""

    __slots__ = ("_event", "only_terminal")

    def __init__(self, only_terminal: bool) -> None:
        self._event = asyncio.Event()
        self.only_terminal = only_terminal

    def wake(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> bool:
        """Wait for a wake-up (True) or `seconds` (False); re-arms for the next one."""
        try:
            async with asyncio.timeout(max(seconds, 0)):
                await self._event.wait()
        except TimeoutError:
            return False
        self._event.clear()
        return True


class Wakeup:
    """The API process's subscriber to wake-up notices and the waiters it wakes."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._channel = wake_channel(settings)
        self._waiters: dict[str, set[Waiter]] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        self.subscribed = asyncio.Event()
        # Counts the subscriptions made: a follower whose mark predates the current one sets it again.
        self.generation = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="aiq-wakeup")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def fallback_seconds(self) -> float:
        """The bound on a wait when notices may be missed (WAKEUP_FALLBACK_SECONDS)."""
        return self._settings.wakeup_fallback_seconds

    def timeout(self, wanted: float) -> float:
        """How long a waiter may sleep: as asked while notices flow, the fallback bound while they cannot."""
        if self.connected:
            return wanted
        return min(wanted, self._settings.wakeup_fallback_seconds)

    @contextlib.contextmanager
    def watch(self, query_id: uuid.UUID, *, only_terminal: bool = False) -> Iterator[Waiter]:
        """Register a waiter for one query (before reading, so a notice in between is not missed)."""
        key = str(query_id)
        waiter = Waiter(only_terminal)
        self._waiters.setdefault(key, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[key]

    def notify(self, query_id: str, type_: str) -> None:
        """Wake the waiters of one query (what a notice does; also usable in-process)."""
        waiters = self._waiters.get(query_id)
        if not waiters:
            return
        terminal = type_ in _TERMINAL_NAMES
        for waiter in waiters:
            if terminal or not waiter.only_terminal:
                waiter.wake()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.wake()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            # A connection of its own, without a read timeout: it sits idle between notices.
            client = redis_client(
                self._settings.redis_url,
                socket_timeout=None,
                connect_timeout=2,
                keepalive=True,
                health_check_interval=10,
            )
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._channel)
                    self.connected = True
                    self.generation += 1
                    self.subscribed.set()
                    delay = 0.1
                    # Notices sent while we were away are lost: everybody re-reads once.
                    self._wake_all()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self.notify(*parse_notice(message["data"]))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self.connected:
                    log.warning("wake-up subscriber disconnected", extra={"error": type(exc).__name__})
            except Exception:
                log.exception("wake-up subscriber failed")
            finally:
                self.connected = False
                self.subscribed.clear()
                with contextlib.suppress(Exception):
                    await client.aclose()
            # Waiters now sleep at most the fallback bound; wake them so they adopt it at once.
            self._wake_all()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)
