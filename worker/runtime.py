"""One asyncio loop per worker process, on its own thread.

Celery's threads pool gives each in-flight message a thread that only waits; the database and LLM I/O of
all of them runs on this loop, so a thousand calls in flight cost a thousand coroutines, not processes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from openai import AsyncOpenAI
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shared.config import Settings
from shared.db import make_engine, make_sessionmaker
from shared.llm import make_client

T = TypeVar("T")


class WorkerRuntime:
    """The loop thread and the per-process clients that live on it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="aiq-loop", daemon=True)
        self._thread.start()
        self.engine: AsyncEngine
        self.sessionmaker: async_sessionmaker[AsyncSession]
        self.llm: AsyncOpenAI
        self.run(self._open())

    async def _open(self) -> None:
        self.engine = make_engine(self.settings, "aiq-worker")
        self.sessionmaker = make_sessionmaker(self.engine)
        self.llm = make_client(self.settings)

    async def _close(self) -> None:
        await self.llm.close()
        await self.engine.dispose()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the loop and wait for it from the calling thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if not self.loop.is_running():
            return
        self.run(self._close(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


_runtime: WorkerRuntime | None = None
_lock = threading.Lock()


def get_runtime(settings: Settings) -> WorkerRuntime:
    """The process's runtime, created on first use (after any fork)."""
    global _runtime
    if _runtime is None or _runtime.owner != f"{socket.gethostname()}:{os.getpid()}":
        with _lock:
            if _runtime is None or _runtime.owner != f"{socket.gethostname()}:{os.getpid()}":
                _runtime = WorkerRuntime(settings)
    return _runtime


def shutdown_runtime() -> None:
    global _runtime
    with _lock:
        if _runtime is not None:
            _runtime.close()
            _runtime = None
