"""The worker's Celery pool: each message's task runs on the runtime's asyncio loop, without a thread.

Celery hands the pool a message's task (its trace: acceptance, the task body, acks-late, events, retries)
as synchronous code. The threads pool gave each message a thread that spent the whole LLM call blocked on
the loop; every message then cost thread hand-offs both ways and the GIL contention of a thousand threads.
Here each message becomes one asyncio task on the runtime's loop, and the synchronous code runs in a
greenlet of its own (`worker.runtime.run_task`): the body's `runtime.run(coro)` awaits the coroutine on the
loop while other messages' tasks run. The semantics stay the threads pool's: the task returns (and its
message is acked, acks-late) only once the attempt is recorded; at most `WORKER_CONCURRENCY` messages are
held at once (the prefetch); a warm shutdown waits for the tasks in flight (each call is handed back after
SHUTDOWN_GRACE_SECONDS, see worker/celery_app.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any

from celery.concurrency.base import BasePool, apply_target
from celery.concurrency.thread import ApplyResult

from worker.runtime import WorkerRuntime, current_runtime, run_task


class LoopPool(BasePool):  # type: ignore[misc] # Celery ships no type hints
    """A Celery pool whose tasks run as coroutines on the worker runtime's loop (`worker_pool` in celery_app)."""

    # Celery stops it from its own thread, never from a signal handler.
    signal_safe = False
    body_can_be_buffer = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._runtime: WorkerRuntime | None = None
        # Tasks in flight, for a warm shutdown to wait on.
        self._running: set[concurrent.futures.Future[Any]] = set()

    def on_start(self) -> None:
        # worker/celery_app.py starts the runtime on `worker_init`, before the pool exists.
        self._runtime = current_runtime()
        if self._runtime is None:
            raise RuntimeError("LoopPool needs the worker runtime: run it with -A worker.celery_app")

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        **_: Any,
    ) -> ApplyResult:
        assert self._runtime is not None, "the pool was not started"
        work = run_task(apply_target, target, args, kwargs, callback, accept_callback)
        future = asyncio.run_coroutine_threadsafe(work, self._runtime.loop)
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        return ApplyResult(future)

    def on_stop(self) -> None:
        """Warm shutdown: wait for the tasks in flight, as the threads pool waits for its threads."""
        concurrent.futures.wait(list(self._running))

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()
        info["running"] = len(self._running)
        return info
