"""The broker side: one Celery configuration for producer (API) and consumer (worker).

The message carries only the query id; PostgreSQL holds the truth, the queue is a wake-up.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import uuid
from typing import Any

import redis.asyncio as aioredis
from celery import Celery

from shared.config import Settings

PROCESS_TASK = "queries.process"
# Moves one batch (`/v1/batches`) a step on: expand lines into queries, notice the end, write the output.
BATCH_TASK = "batches.advance"
# One webhook delivery (its id); sent when a query ends and by the worker's webhook sweep.
DELIVER_WEBHOOK_TASK = "webhooks.deliver"
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
        # Task events cost a Redis publish per task state. Flower switches them on in the workers it watches
        # (its default `--enable_events`), so the price is paid only while someone is looking.
        "worker_send_task_events": settings.worker_send_task_events,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def make_celery(settings: Settings) -> Celery:
    """A Celery app with AIQ's configuration and no tasks."""
    app = Celery("aiq")
    app.conf.update(celery_config(settings))
    return app


def encode_task_message(query_id: uuid.UUID, queue: str, task: str = PROCESS_TASK) -> bytes:
    """The exact envelope Celery's `send_task` puts on a Redis list (protocol 2, JSON, no ETA).

    The task id is the query id (or the batch id): every delivery of a query is the same task to Celery and
    Flower.
    """
    task_id = str(query_id)
    args = [str(query_id)]
    body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    message = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr(args),
            "kwargsrepr": "{}",
            "origin": _ORIGIN,
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": str(uuid.uuid4()),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(message).encode()


_ORIGIN = f"aiq-api-{os.getpid()}@{socket.gethostname()}"


class Publisher:
    """Sends `queries.process` by name; a slow or dead broker costs a request at most the timeout.

    The async path LPUSHes Celery's own message format straight onto the queue's Redis list: one round
    trip and no kombu machinery on the API's hot path and the sweeper. `publish_sync` is a real `send_task`
    for tools and tests (the worker's delayed retries go through Celery's own `Task.retry`). Either way the
    task id is the query id.
    """

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self._settings = settings
        self._app = app
        # Only an app made here is closed here; a worker's own app closes with the worker.
        self._owns_app = app is None
        self._redis: aioredis.Redis | None = None

    def _client(self) -> aioredis.Redis:
        # Created on first use, inside the event loop that will use it.
        if self._redis is None:
            timeout = self._settings.publish_timeout_seconds
            self._redis = aioredis.Redis.from_url(
                self._settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        return self._redis

    def publish_sync(self, query_id: uuid.UUID, countdown: float | None = None) -> None:
        """Blocking `send_task` (workers use it from their own threads)."""
        if self._app is None:
            self._app = make_celery(self._settings)
        self._app.send_task(
            PROCESS_TASK,
            args=[str(query_id)],
            task_id=str(query_id),
            queue=self._settings.queue_name,
            countdown=countdown,
        )

    async def publish(self, query_id: uuid.UUID, task: str = PROCESS_TASK) -> bool:
        """Publish without blocking the event loop; False if the broker did not take it in time.

        `task` names another task taking one id (`webhooks.deliver`: the id is the delivery's;
        `batches.advance`: the batch's).
        """
        queue = self._settings.queue_name
        try:
            await asyncio.wait_for(
                self._client().lpush(queue, encode_task_message(query_id, queue, task)),
                timeout=self._settings.publish_timeout_seconds,
            )
        except Exception as exc:  # noqa: BLE001 - any broker failure leaves the row pending for recovery
            log.warning(
                "publish failed; query stays pending", extra={"query_id": str(query_id), "error": type(exc).__name__}
            )
            return False
        return True

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def close(self) -> None:
        if self._app is not None and self._owns_app:
            self._app.close()
