"""One asyncio loop per worker process, on its own thread.

Every in-flight message's task runs on this loop (worker/pool.py): its synchronous Celery code in a greenlet
of its own, its database and LLM I/O as coroutines, so a thousand calls in flight cost a thousand coroutines,
not threads or processes. The loop also runs the background loops the worker's start-up hands it (lease
renewal, the recovery sweeper).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import asyncpg
import greenlet
import redis.asyncio as aioredis
from celery import Celery
from openai import AsyncOpenAI
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shared.config import Settings
from shared.db import make_engine, make_raw_pool, make_redis, make_sessionmaker
from shared.events import EventLog
from shared.limits import Limiter
from shared.llm import make_client
from shared.queue import Publisher
from shared.repositories.queries_asyncpg import Claim
from shared.upstream import UpstreamBudget

T = TypeVar("T")
log = logging.getLogger(__name__)


class StopReason(StrEnum):
    """Why a running LLM call was stopped before its answer came."""

    CANCEL = "cancel"
    SHUTDOWN = "shutdown"
    # Another worker owns the row now: the lease was not renewed in time.
    LOST = "lost"


@dataclass
class InFlight:
    """A running LLM call, and why it was stopped if it was."""

    claim: Claim
    task: asyncio.Task[Any]
    stop_reason: StopReason | None = None


BackgroundLoop = Callable[["WorkerRuntime"], Coroutine[Any, Any, None]]
# A model's dispatcher (worker/dispatcher.py): runs its waiting work as the upstream budget allows.
DrainFn = Callable[["WorkerRuntime", str], Coroutine[Any, Any, None]]


class WorkerRuntime:
    """The loop thread and the per-process clients that live on it."""

    def __init__(
        self, settings: Settings, app: Celery, loops: Sequence[BackgroundLoop], drain: DrainFn | None = None
    ) -> None:
        self.settings = settings
        self.owner = _owner_id()
        self.pid = os.getpid()
        self.inflight: dict[tuple[uuid.UUID, int], InFlight] = {}
        self.publisher = Publisher(settings, app)
        self._loops = loops
        self.loop = new_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="aiq-loop", daemon=True)
        self._thread.start()
        self._background: list[asyncio.Task[None]] = []
        self._drain = drain
        # Models whose dispatcher runs in this process, and the attempts dispatchers started.
        self.draining: dict[str, asyncio.Task[None]] = {}
        self.dispatched: set[asyncio.Task[Any]] = set()
        self.dispatch_slots = asyncio.Semaphore(settings.worker_concurrency)
        self.engine: AsyncEngine
        self.sessionmaker: async_sessionmaker[AsyncSession]
        self.raw_pool: asyncpg.Pool
        self.llm: AsyncOpenAI
        self.redis: aioredis.Redis
        self.limiter: Limiter
        self.budget: UpstreamBudget
        self.events: EventLog
        self.run(self._open())

    async def _open(self) -> None:
        self.engine = make_engine(self.settings, "aiq-worker")
        self.sessionmaker = make_sessionmaker(self.engine)
        # Claims and outcome writes: one compiled statement each, a round trip and no ORM per step.
        self.raw_pool = await make_raw_pool(self.settings, "aiq-worker")
        self.llm = make_client(self.settings)
        # Settling a finished query's token reservation (shared/limits.py).
        self.redis = make_redis(self.settings)
        self.limiter = Limiter(self.redis, self.settings)
        self.budget = UpstreamBudget(self.redis, self.settings)
        # Each query's event log (streams, wake-ups): appended to from every step of an attempt.
        self.events = EventLog(self.redis, self.settings)
        self._background.extend(asyncio.create_task(loop(self)) for loop in self._loops)

    def wake(self, model: str) -> None:
        """On the loop: make sure this process runs a dispatcher for the model's waiting work."""
        task = self.draining.get(model)
        if self._drain is None or (task is not None and not task.done()):
            return
        # A context of its own: not the one of the delivery that woke it (its query id would tag every log line).
        self.draining[model] = asyncio.create_task(self._drain(self, model), context=contextvars.Context())

    async def _close(self) -> None:
        for task in self.draining.values():
            task.cancel()
        await asyncio.gather(*self.draining.values(), return_exceptions=True)
        # Attempts a dispatcher started are no Celery task (Celery's own have ended by now): a few seconds to
        # finish, then they are handed back like any call at shutdown.
        if self.dispatched:
            await asyncio.wait(list(self.dispatched), timeout=5)
        for key in list(self.inflight):
            self.stop_call(key, StopReason.SHUTDOWN)
        await asyncio.gather(*self.dispatched, return_exceptions=True)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.publisher.aclose()
        await self.llm.close()
        await self.redis.aclose()
        await self.raw_pool.close()
        await self.engine.dispose()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the loop and wait for it: from a task's greenlet on the loop (see `run_task`),
        by handing it to the loop's side of that greenlet; from any other thread, by blocking that thread."""
        current = greenlet.getcurrent()
        if isinstance(current, TaskGreenlet):
            awaited = coro if timeout is None else asyncio.wait_for(coro, timeout)
            result: T = current.parent.switch(awaited)
            return result
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def track(self, claim: Claim, task: asyncio.Task[Any]) -> InFlight:
        entry = InFlight(claim, task)
        self.inflight[(claim.query_id, claim.attempt)] = entry
        return entry

    def untrack(self, claim: Claim) -> None:
        self.inflight.pop((claim.query_id, claim.attempt), None)

    def stop_call(self, key: tuple[uuid.UUID, int], reason: StopReason) -> None:
        """Stop waiting on one LLM call; its coroutine records the outcome that fits the reason."""
        entry = self.inflight.get(key)
        if entry is not None and entry.stop_reason is None:
            entry.stop_reason = reason
            entry.task.cancel()

    def stop_all_calls(self, reason: StopReason) -> None:
        """Thread-safe: stop every call in flight (graceful shutdown past its grace period)."""

        def stop_all() -> None:
            for key in list(self.inflight):
                self.stop_call(key, reason)

        self.loop.call_soon_threadsafe(stop_all)

    def close(self) -> None:
        if not self.loop.is_running():
            return
        self.run(self._close(), timeout=10)
        self.publisher.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class TaskGreenlet(greenlet.greenlet):  # type: ignore[misc] # greenlet's C type is untyped to mypy
    """A Celery task's synchronous code, running on the loop thread inside `run_task`."""


async def run_task(fn: Callable[..., T], *args: Any) -> T:
    """On the loop: run synchronous `fn` (a Celery task and its bookkeeping) to its end without a thread.

    `fn` runs in a greenlet of its own that shares this coroutine's context variables. Each
    `WorkerRuntime.run(coro)` it makes switches back here with the coroutine, which is awaited on the loop
    while other tasks run; its result (or exception) is switched back in. The rest of `fn` is ordinary
    synchronous code that runs on the loop thread, so it must not block for long (Celery's own publishes, a
    retry's re-send, are the only blocking I/O left there).
    """
    here = greenlet.getcurrent()
    task = TaskGreenlet(fn, here)
    task.gr_context = here.gr_context
    pending = task.switch(*args)
    while not task.dead:
        try:
            value = await pending
        except BaseException as exc:  # noqa: BLE001 - handed to the task's code, which decides
            pending = task.throw(exc)
        else:
            pending = task.switch(value)
    result: T = pending
    return result


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop (libuv, in C) where it is installed, as under the API's uvicorn; else the stdlib loop.

    Every call's scheduling, socket reads and writes (asyncpg, redis, aiohttp) go through it: the stdlib
    loop's Python internals were a tenth of the worker's CPU per answer.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without a uvloop wheel
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


_runtime: WorkerRuntime | None = None
_lock = threading.Lock()


def get_runtime(
    settings: Settings, app: Celery, loops: Sequence[BackgroundLoop], drain: DrainFn | None = None
) -> WorkerRuntime:
    """The process's runtime, created on first use (after any fork) with the background loops to run."""
    global _runtime
    # Every task asks: the pid (not the hostname lookup of `_owner_id`) tells a fork apart.
    if _runtime is None or _runtime.pid != os.getpid():
        with _lock:
            if _runtime is None or _runtime.pid != os.getpid():
                _runtime = WorkerRuntime(settings, app, loops, drain)
    return _runtime


def current_runtime() -> WorkerRuntime | None:
    return _runtime


def shutdown_runtime() -> None:
    global _runtime
    with _lock:
        if _runtime is not None:
            _runtime.close()
            _runtime = None
