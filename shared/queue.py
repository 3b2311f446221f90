"""The broker side: one Celery configuration for producer (API) and consumer (worker).

The message carries only the query id; PostgreSQL holds the truth, the queue is a wake-up.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery

from shared.config import Settings

PROCESS_TASK = "queries.process"
log = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Settings for both sides; the worker part makes a bare `celery worker` correct."""
    # Redelivery of an unacked message must not start while a healthy attempt is still running:
    # the longest call plus the longest short retry delay, with room to spare.
    visibility_timeout = int(max(300, 2 * (settings.llm_timeout_seconds + settings.retry_max_seconds)))
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout,
            "socket_connect_timeout": 2,
            "socket_timeout": 10,
        },
        "task_default_queue": settings.queue_name,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.3,
        },
        "worker_prefetch_multiplier": 1,
        # Each in-flight LLM call is a waiting thread; the calls themselves run on one asyncio loop.
        "worker_pool": "threads",
        "worker_concurrency": settings.worker_concurrency,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def make_celery(settings: Settings) -> Celery:
    """A Celery app with AIQ's configuration and no tasks."""
    app = Celery("aiq")
    app.conf.update(celery_config(settings))
    return app


class Publisher:
    """Sends `queries.process` by name; a slow or dead broker costs a request at most the timeout."""

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self._settings = settings
        self._app = app or make_celery(settings)
        # Publishing is blocking kombu I/O: a small dedicated pool bounds what a hung broker can hold.
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="aiq-publish")

    def publish_sync(self, query_id: uuid.UUID, countdown: float | None = None) -> None:
        """Blocking publish (workers use this from their own threads)."""
        self._app.send_task(PROCESS_TASK, args=[str(query_id)], queue=self._settings.queue_name, countdown=countdown)

    async def publish(self, query_id: uuid.UUID) -> bool:
        """Publish without blocking the event loop; False if the broker did not take it in time."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self.publish_sync, query_id)
        try:
            await asyncio.wait_for(future, timeout=self._settings.publish_timeout_seconds)
        except Exception as exc:  # noqa: BLE001 - any broker failure leaves the row pending for recovery
            log.warning(
                "publish failed; query stays pending", extra={"query_id": str(query_id), "error": type(exc).__name__}
            )
            return False
        return True

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._app.close()
