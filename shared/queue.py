"""The broker side: one Celery configuration for producer (API) and consumer (worker).

The message carries only the query id; PostgreSQL holds the truth, the queue is a wake-up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from celery import Celery
from kombu.entity import Exchange, Queue
from redis.exceptions import RedisError

from shared.config import Settings
from shared.db import redis_client, redis_py_url
from shared.scriptbatch import ScriptBatch

PROCESS_TASK = "queries.process"
# Moves one batch (`/v1/batches`) a step on: expand lines into queries, notice the end, write the output.
BATCH_TASK = "batches.advance"
# One webhook delivery (its id); sent when a query ends and by the worker's webhook sweep.
DELIVER_WEBHOOK_TASK = "webhooks.deliver"
# RabbitMQ: replicated and durable; quorum queues have no per-message priority (flow control's choice of the
# next query is made in PostgreSQL, not on the broker).
QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}
RECONNECT_INTERVAL_SECONDS = 0.5
log = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Settings for both sides; the worker part makes a bare `celery worker` correct."""
    conf: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
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
        # Prefetch = concurrency x 1: each reserved message's task runs at once, none waits behind another's
        # LLM call (on RabbitMQ that is the consumer's static basic.qos: quorum queues have no global QoS).
        # The worker's pool (worker/pool.py: every task a coroutine on one asyncio loop) is set by worker/celery_app.py.
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        # Task events cost a broker publish per task state. Flower switches them on in the workers it watches
        # (its default `--enable_events`), so the price is paid only while someone is looking.
        "worker_send_task_events": settings.worker_send_task_events,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }
    if settings.broker_is_amqp:
        conf["broker_transport_options"] = {"confirm_publish": True, "connect_timeout": 2}
        # Worker, Celery's own send_task and the API's direct publish all agree on this one declaration.
        conf["task_queues"] = [task_queue(settings.queue_name)]
    else:
        conf["broker_transport_options"] = {
            # kombu emulates AMQP acks on Redis by default: each delivered message is written to an unacked hash
            # and index (one MULTI/EXEC) and removed on ack (another), so a dead consumer's messages come back
            # after a visibility timeout. AIQ does not rely on it: a killed worker's claims come back when their
            # lease expires, a message it held but had not started leaves a due pending row the sweeper re-sends
            # (both sooner than any visibility timeout), and a restarted Redis loses the hash anyway. Off, unacked
            # messages live in the worker's memory (a warm shutdown or a requeue still puts them back on the
            # list) and a message costs its BRPOP alone.
            "ack_emulation": False,
            "socket_connect_timeout": 2,
            "socket_timeout": 10,
        }
    return conf


def task_queue(name: str) -> Queue:
    """The RabbitMQ queue: durable and replicated (quorum), bound to a topic exchange of its own name.

    The topic exchange lets Celery's native delayed delivery (declared by workers whenever a quorum queue is
    configured) route a `retry(countdown=…)` back to it: the delay waits in RabbitMQ's `celery_delayed_*` queues,
    not as an unacknowledged ETA message in a worker's memory, where RabbitMQ's `consumer_timeout` (30 min by
    default) would close the channel. The API publishes to the default exchange with the queue's name.
    """
    # kombu ships no type hints for its entities.
    return Queue(  # type: ignore[no-untyped-call]
        name,
        Exchange(name, type="topic", durable=True),  # type: ignore[no-untyped-call]
        routing_key=name,
        durable=True,
        queue_arguments=QUEUE_ARGUMENTS,
    )


def max_eta_seconds(settings: Settings) -> float:
    """The longest retry delay sent as a delayed message; longer ones are left to the sweeper.

    On Redis an ETA message waits in the worker's memory until it is due (lost with the worker, like any
    message it holds: the sweeper re-sends the due row); on RabbitMQ the delay waits in the broker (native
    delayed delivery). The bound, the longest call plus the longest short retry delay and at least 150 s,
    keeps the two brokers' behaviour alike.
    """
    return float(max(150, settings.llm_timeout_seconds + settings.retry_max_seconds))


def make_celery(settings: Settings) -> Celery:
    """A Celery app with AIQ's configuration and no tasks."""
    app = Celery("aiq")
    app.conf.update(celery_config(settings))
    return app


def task_headers(task: str, task_id: str, args: list[Any]) -> dict[str, Any]:
    """Celery's protocol-2 task headers, as `send_task` writes them (no ETA, no expiry)."""
    return {
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
    }


def task_body(args: list[Any]) -> bytes:
    """Celery's protocol-2 body: args, kwargs, embedded options."""
    return json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()


def encode_task_message(query_id: uuid.UUID, queue: str, task: str = PROCESS_TASK) -> bytes:
    """The exact envelope Celery's `send_task` puts on a Redis list (protocol 2, JSON, no ETA).

    The task id is the query id (or the batch id): every delivery of a query is the same task to Celery and
    Flower.
    """
    return encode_redis_message(task, [str(query_id)], str(query_id), queue)


def encode_redis_message(task: str, args: list[Any], task_id: str, queue: str) -> bytes:
    """Kombu's Redis envelope around a Celery message: base64 body, headers, properties."""
    message = {
        "body": base64.b64encode(task_body(args)).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": task_headers(task, task_id, args),
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


def amqp_message(task: str, args: list[Any], task_id: str) -> aio_pika.Message:
    """The AMQP message Celery's `send_task` publishes: headers are the task headers, the body plain JSON."""
    return aio_pika.Message(
        task_body(args),
        headers=task_headers(task, task_id, args),
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=task_id,
        reply_to=str(uuid.uuid4()),
        priority=0,
    )


_ORIGIN = f"aiq-api-{os.getpid()}@{socket.gethostname()}"


class _RedisBroker:
    """LPUSH of Celery's exact Redis envelope: one round trip, no kombu machinery (with the scripted steps that
    go first, when there are any)."""

    def __init__(self, settings: Settings) -> None:
        timeout = settings.publish_timeout_seconds
        self._client = redis_client(settings.broker_url, socket_timeout=timeout, connect_timeout=timeout)

    async def send(
        self, queue: str, task: str, args: list[Any], task_id: str, first: ScriptBatch | None = None
    ) -> list[Any]:
        """LPUSH the message, behind `first`'s scripts in the same pipeline (not a transaction: a script's error
        is its own result); their results. A refused LPUSH raises."""
        message = encode_redis_message(task, args, task_id, queue)
        if first is None:
            await self._client.lpush(queue, message)
            return []
        pipe = self._client.pipeline(transaction=False)
        first.queue_on(pipe)
        pipe.lpush(queue, message)
        *steps, pushed = await pipe.execute(raise_on_error=False)
        if isinstance(pushed, Exception):
            raise pushed
        return steps

    async def ping(self) -> None:
        await self._client.ping()

    async def depth(self, queue: str) -> int:
        return int(await self._client.llen(queue))

    async def aclose(self) -> None:
        await self._client.aclose()


class _AmqpBroker:
    """One persistent connection and confirm-mode channel; a publish returns once RabbitMQ has confirmed it.

    A nack (e.g. a queue at its length limit with `reject-publish`) is a failed publish. `mandatory` makes an
    unroutable message come back instead of vanishing; the queue is then declared and the message sent again.
    """

    def __init__(self, settings: Settings) -> None:
        self._url = settings.broker_url
        self._timeout = settings.publish_timeout_seconds
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self._next_connect = 0.0
        self._last_confirm = 0.0
        self._closing: set[asyncio.Future[None]] = set()

    async def _ready(self) -> AbstractChannel:
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                self._drop_soon()
                # While the broker is down, one connection attempt per interval, not one per request: the
                # others fail at once (their rows wait for the sweeper) instead of each paying for a connect.
                if time.monotonic() < self._next_connect:
                    raise ConnectionError("broker unreachable; next connection attempt shortly")
                self._next_connect = time.monotonic() + RECONNECT_INTERVAL_SECONDS
                # Plain (not robust) connection: a dead one is replaced on the next use, under the caller's
                # timeout, rather than by a background reconnect loop whose publishes would wait unbounded.
                connection = await aio_pika.connect(
                    self._url, timeout=self._timeout, client_properties={"connection_name": _ORIGIN}
                )
                self._connection = connection  # type: ignore[assignment]
                self._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                self._next_connect = 0.0
                self._last_confirm = time.monotonic()
            return self._channel

    async def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            # It is being replaced: a close that fails changes nothing.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), self._timeout)

    def _drop_soon(self) -> None:
        """Forget the connection now and close it in the background: the caller's timeout stays its bound."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            closing = asyncio.ensure_future(self._close_quietly(connection))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def _close_quietly(self, connection: AbstractRobustConnection) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), self._timeout)

    async def send(self, queue: str, task: str, args: list[Any], task_id: str) -> None:
        channel = await self._ready()
        message = amqp_message(task, args, task_id)
        try:
            try:
                await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)
            except aio_pika.exceptions.PublishError:
                # Returned unroutable: no worker has declared the queue yet (a first deploy, API first). Declare it
                # exactly as Celery does, so the message waits for the workers, and send it again.
                await channel.declare_queue(queue, durable=True, arguments=QUEUE_ARGUMENTS)
                await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)
        except aio_pika.exceptions.DeliveryError:
            raise  # nacked or returned: the channel is still good
        except BaseException:
            # A timeout while other publishes are being confirmed is a slow broker: keep the connection (dropping
            # it would fail them all). Nothing confirmed for a whole timeout: a dead connection, start afresh.
            if time.monotonic() - self._last_confirm > self._timeout:
                self._drop_soon()
            raise
        self._last_confirm = time.monotonic()

    async def ping(self) -> None:
        await self._ready()

    async def depth(self, queue: str) -> int:
        await self._ready()
        connection = self._connection
        if connection is None:
            raise ConnectionError("broker connection lost")
        # A channel of its own: a passive declare of a missing queue closes the channel it runs on.
        async with connection.channel(publisher_confirms=False) as probe:
            declared = await probe.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)

    async def aclose(self) -> None:
        await self._drop()
        await asyncio.gather(*self._closing, return_exceptions=True)


class Publisher:
    """Sends tasks by name to the configured broker; a slow or dead broker costs a request at most the timeout.

    The async path writes Celery's own message format straight to the broker: an LPUSH onto the queue's Redis
    list, or a confirmed AMQP publish to RabbitMQ's default exchange with the queue's name. No kombu machinery on
    the API's hot path and the sweeper. `publish_sync` is a real `send_task` for tools and tests (the worker's
    delayed retries go through Celery's own `Task.retry`). Either way the task id is the query id.
    """

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self._settings = settings
        self._app = app
        # Only an app made here is closed here; a worker's own app closes with the worker.
        self._owns_app = app is None
        self._broker: _RedisBroker | _AmqpBroker | None = None
        # The broker is the app's Redis (the default: BROKER_URL unset): steps on it can ride with a message.
        self._carries_steps = not settings.broker_is_amqp and redis_py_url(settings.broker_url) == redis_py_url(
            settings.redis_url
        )

    def _client(self) -> _RedisBroker | _AmqpBroker:
        # Created on first use, inside the event loop that will use it.
        if self._broker is None:
            self._broker = (
                _AmqpBroker(self._settings) if self._settings.broker_is_amqp else _RedisBroker(self._settings)
            )
        return self._broker

    def publish_sync(self, query_id: uuid.UUID, countdown: float | None = None, task: str = PROCESS_TASK) -> None:
        """Blocking `send_task` (tools and tests)."""
        if self._app is None:
            self._app = make_celery(self._settings)
        self._app.send_task(
            task,
            args=[str(query_id)],
            task_id=str(query_id),
            queue=self._settings.queue_name,
            countdown=countdown,
        )

    async def publish(self, query_id: uuid.UUID, task: str = PROCESS_TASK, *, first: ScriptBatch | None = None) -> bool:
        """Send `task` for this id (`queries.process`, `webhooks.deliver` with a delivery's id, `batches.advance`
        with a batch's); False if the broker did not take it in time. `first`: see `send`."""
        return await self.send(task, [str(query_id)], str(query_id), first=first)

    async def send(self, task: str, args: list[Any], task_id: str, *, first: ScriptBatch | None = None) -> bool:
        """Send any task by name without blocking the event loop; False if the broker did not confirm it in time.

        `first`: scripted steps on the app's Redis that must precede the message (a new query's `queued`
        event). When the broker is that Redis they ride in the message's round trip, ahead of it, within the
        same deadline; otherwise (RabbitMQ, another Redis) they run just before the send. Their outcomes are
        theirs (`first.results`, an error never raised), never the publish's."""
        queue = self._settings.queue_name
        carried = first if self._carries_steps else None
        if first is not None and carried is None:
            with contextlib.suppress(RedisError, OSError):
                await first.run()
        steps: list[Any] = []
        try:
            # A deadline on this task, not `wait_for`'s extra task per publish.
            async with asyncio.timeout(self._settings.publish_timeout_seconds):
                broker = self._client()
                if isinstance(broker, _RedisBroker):
                    steps = await broker.send(queue, task, args, task_id, carried)
                else:
                    await broker.send(queue, task, args, task_id)
        except Exception as exc:  # noqa: BLE001 - any broker failure leaves the row pending for recovery
            if carried is not None:
                carried.lost(exc)
            log.warning(
                "publish failed; query stays pending",
                extra={"query_id": task_id, "task": task, "error": type(exc).__name__},
            )
            return False
        if carried is not None:
            # Outside the deadline: the message is in. A step Redis did not know (only after a Redis restart or
            # SCRIPT FLUSH) is run again here, which loads it; it then follows the message instead of preceding it.
            await carried.settle(steps)
        return True

    async def ping(self) -> None:
        """Raises unless the broker answers (Redis PING; an open AMQP connection and channel)."""
        await self._client().ping()

    async def depth(self) -> int:
        """Messages waiting in the queue, not yet delivered to a worker."""
        return await self._client().depth(self._settings.queue_name)

    async def aclose(self) -> None:
        if self._broker is not None:
            await self._broker.aclose()
            self._broker = None

    def close(self) -> None:
        if self._app is not None and self._owns_app:
            self._app.close()
