"""The API's direct publish writes exactly what Celery's own send_task writes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis
from kombu import Connection

from devkit.procs import free_port
from shared.config import Settings
from shared.events import EventLog, EventType
from shared.queue import Publisher, encode_task_message
from tests.support.amqp import delete_amqp_queues


def _shape(message: dict[str, object]) -> tuple[object, ...]:
    headers = message["headers"]
    properties = message["properties"]
    assert isinstance(headers, dict)
    assert isinstance(properties, dict)
    return (
        sorted(message),
        sorted(headers),
        sorted(properties),
        headers["task"],
        properties["delivery_info"],
        json.loads(base64.b64decode(str(message["body"]))),
    )


def test_direct_message_matches_celery_send_task(server_urls: dict[str, str]) -> None:
    queue = f"aiq.shape.{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=server_urls["redis"], queue_name=queue, jwt_secret_key="k" * 48)  # type: ignore[arg-type]
    query_id = uuid.uuid4()
    publisher = Publisher(settings)
    client = redis.Redis.from_url(server_urls["redis"])
    try:
        publisher.publish_sync(query_id)
        raw = client.rpop(queue)
        assert isinstance(raw, bytes)
        celery_message = json.loads(raw)
    finally:
        client.delete(queue)
        client.close()
        publisher.close()
    ours = json.loads(encode_task_message(query_id, queue))
    assert _shape(ours) == _shape(celery_message)
    # Every delivery of a query is the same task (Flower's /task/<query_id>), whichever path sent it.
    assert ours["headers"]["id"] == celery_message["headers"]["id"] == str(query_id)
    assert ours["properties"]["correlation_id"] == str(query_id)


def test_direct_amqp_message_matches_celery_send_task(amqp_url: str) -> None:
    """On RabbitMQ too: the API's aio-pika message carries what Celery's own send_task carries."""
    queue = f"aiq.shape.{uuid.uuid4().hex[:8]}"
    settings = Settings(broker_url=amqp_url, queue_name=queue, jwt_secret_key="k" * 48)  # type: ignore[arg-type]
    celery_id, our_id = uuid.uuid4(), uuid.uuid4()
    publisher = Publisher(settings)

    async def publish_ours() -> bool:
        try:
            return await publisher.publish(our_id)
        finally:
            await publisher.aclose()

    try:
        publisher.publish_sync(celery_id)
        assert asyncio.run(publish_ours())
        with Connection(amqp_url) as conn, conn.channel() as channel:
            theirs, ours = channel.basic_get(queue, no_ack=True), channel.basic_get(queue, no_ack=True)
    finally:
        publisher.close()
        delete_amqp_queues(amqp_url, queue)
    assert theirs is not None
    assert ours is not None

    def shape(message: Any, task_id: uuid.UUID) -> tuple[object, ...]:
        headers = dict(message.headers)
        assert headers["id"] == headers["root_id"] == str(task_id)
        props = message.properties
        return (
            sorted(headers),
            headers["task"],
            headers["argsrepr"] == repr([str(task_id)]),
            props["content_type"],
            props["content_encoding"],
            props["delivery_mode"],
            props["correlation_id"] == str(task_id),
            bool(props.get("reply_to")),
            json.loads(message.body)[1:],
        )

    assert shape(ours, our_id) == shape(theirs, celery_id)
    assert json.loads(ours.body)[0] == [str(our_id)]


class _CuttableProxy:
    """A TCP relay to the broker whose connections the test can cut, as a broker restart or a network cut does."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


def test_amqp_publisher_reconnects_after_its_connection_dies(amqp_url: str) -> None:
    """A cut connection (broker restart, network) costs at most the publishes in flight, then it reconnects."""
    queue = f"aiq.reconnect.{uuid.uuid4().hex[:8]}"
    url = urlsplit(amqp_url)

    async def scenario() -> tuple[bool, list[bool], int]:
        proxy = _CuttableProxy(url.hostname or "127.0.0.1", url.port or 5672)
        port = await proxy.start()
        through_proxy = url._replace(netloc=f"{url.netloc.rpartition('@')[0]}@127.0.0.1:{port}").geturl()
        settings = Settings(broker_url=through_proxy, queue_name=queue, jwt_secret_key="k" * 48)  # type: ignore[arg-type]
        publisher = Publisher(settings)
        try:
            first = await publisher.publish(uuid.uuid4())
            proxy.cut()
            later = []
            for _ in range(10):
                later.append(await publisher.publish(uuid.uuid4()))
                await asyncio.sleep(0.2)
            return first, later, await publisher.depth()
        finally:
            await publisher.aclose()
            await proxy.close()

    try:
        first, later, depth = asyncio.run(scenario())
    finally:
        delete_amqp_queues(amqp_url, queue)
    assert first
    # Within about a second of the cut every publish is confirmed again, and every confirmed one is queued.
    assert all(later[5:]), later
    assert depth == 1 + sum(later)


def test_any_task_travels_by_name_on_both_brokers(server_urls: dict[str, str]) -> None:
    """The direct publish is not tied to `queries.process`: another task (e.g. a webhook delivery) goes by name."""
    # Kombu's spelling of the Redis URL (an embedded Redis listens on a unix socket: `redis+socket://`).
    brokers = {"redis": Settings(redis_url=server_urls["redis"]).broker_url}  # type: ignore[arg-type]
    if os.environ.get("TEST_AMQP_URL"):
        brokers["amqp"] = os.environ["TEST_AMQP_URL"]
    task_id = str(uuid.uuid4())
    for kind, url in brokers.items():
        queue = f"aiq.byname.{uuid.uuid4().hex[:8]}"
        settings = Settings(redis_url=server_urls["redis"], broker_url=url, queue_name=queue, jwt_secret_key="k" * 48)  # type: ignore[arg-type]
        publisher = Publisher(settings)

        async def send(p: Publisher = publisher) -> bool:
            try:
                return await p.send("webhooks.deliver", [task_id, 3], task_id)
            finally:
                await p.aclose()

        try:
            assert asyncio.run(send()), kind
            if kind == "redis":
                client = redis.Redis.from_url(server_urls["redis"])
                raw = client.rpop(queue)
                client.close()
                assert isinstance(raw, bytes)
                message = json.loads(raw)
                headers, body = message["headers"], json.loads(base64.b64decode(message["body"]))
            else:
                with Connection(url) as conn, conn.channel() as channel:
                    got = channel.basic_get(queue, no_ack=True)
                assert got is not None
                headers, body = dict(got.headers), json.loads(got.body)
        finally:
            if kind == "redis":
                redis.Redis.from_url(server_urls["redis"]).delete(queue)
            else:
                delete_amqp_queues(url, queue)
        assert headers["task"] == "webhooks.deliver", kind
        assert headers["id"] == task_id, kind
        assert body[0] == [task_id, 3], kind


def _queued_then_publish(settings: Settings, query_id: uuid.UUID) -> tuple[bool, Any, list[int], float]:
    """A new query's dispatch: its `queued` event as the step that goes first, then the publish. What the
    publish said, the event's result, how many commands each pipeline sent, and how long it took."""
    sent: list[int] = []
    real_execute = aioredis.client.Pipeline.execute

    async def counting_execute(self: aioredis.client.Pipeline, raise_on_error: bool = True) -> list[object]:
        sent.append(len(self.command_stack))
        return await real_execute(self, raise_on_error)

    async def go() -> tuple[bool, Any, list[int], float]:
        client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=1)
        events = EventLog(client, settings)
        publisher = Publisher(settings)
        try:
            first = events.batch()
            index = events.append_in(first, query_id, EventType.QUEUED, {"model": "m"}, None, notify=False)
            started = time.monotonic()
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(aioredis.client.Pipeline, "execute", counting_execute)
                published = await publisher.publish(query_id, first=first)
            return published, first.results[index], sent, time.monotonic() - started
        finally:
            await publisher.aclose()
            await client.aclose()

    return asyncio.run(go())


def test_a_new_querys_event_and_message_go_in_one_round_trip_on_the_apps_redis(server_urls: dict[str, str]) -> None:
    queue = f"aiq.first.{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=server_urls["redis"], queue_name=queue, jwt_secret_key="k" * 48)  # type: ignore[arg-type]
    query_id = uuid.uuid4()
    published, seq, sent, _ = _queued_then_publish(settings, query_id)
    client = redis.Redis.from_url(server_urls["redis"])
    try:
        raw = client.rpop(queue)
        events = client.xrange(f"aiq:{queue}:ev:{query_id}")
    finally:
        client.delete(queue, f"aiq:{queue}:ev:{query_id}", f"aiq:{queue}:ev:{query_id}:seq")
        client.close()
    assert published is True
    # One pipeline: the event's script, then the LPUSH.
    assert sent == [2]
    assert seq == 1
    assert [fields[b"t"] for _, fields in events] == [b"queued"]
    assert isinstance(raw, bytes)
    assert json.loads(raw)["headers"]["id"] == str(query_id)


def test_a_dead_broker_on_another_redis_still_gets_the_event_first_and_answers_false_in_time(
    server_urls: dict[str, str],
) -> None:
    queue = f"aiq.first.{uuid.uuid4().hex[:8]}"
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(  # type: ignore[arg-type]
        redis_url=server_urls["redis"], broker_url=dead, queue_name=queue, jwt_secret_key="k" * 48
    )
    query_id = uuid.uuid4()
    published, seq, sent, took = _queued_then_publish(settings, query_id)
    client = redis.Redis.from_url(server_urls["redis"])
    try:
        events = client.xrange(f"aiq:{queue}:ev:{query_id}")
    finally:
        client.delete(f"aiq:{queue}:ev:{query_id}", f"aiq:{queue}:ev:{query_id}:seq")
        client.close()
    # The event went alone on the app's Redis, before the publish; the publish failed within its deadline.
    assert (published, seq, sent) == (False, 1, [1])
    assert [fields[b"t"] for _, fields in events] == [b"queued"]
    assert took < settings.publish_timeout_seconds + 0.5, took


def test_a_dead_shared_redis_fails_the_publish_in_time_and_the_event_quietly() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(redis_url=dead, queue_name="aiq.first.dead", jwt_secret_key="k" * 48)  # type: ignore[arg-type]
    published, result, _sent, took = _queued_then_publish(settings, uuid.uuid4())
    assert published is False
    assert isinstance(result, Exception)
    assert took < settings.publish_timeout_seconds + 0.5, took


def test_a_burst_of_publishes_beyond_the_pool_waits_for_connections_instead_of_failing(
    server_urls: dict[str, str],
) -> None:
    # 2,000 SSE clients submitting at once made one API process publish hundreds of messages concurrently:
    # redis-py's default pool refused the 101st in flight (MaxConnectionsError), and those queries waited for
    # the sweeper. The publisher's pool is bounded and queues.
    queue = f"aiq.burst.{uuid.uuid4().hex[:8]}"
    # A deadline no busy machine reaches: what is tested is waiting for a connection, not the deadline.
    settings = Settings(
        redis_url=server_urls["redis"],  # type: ignore[arg-type]
        queue_name=queue,
        jwt_secret_key="k" * 48,
        publish_timeout_seconds=60,
    )
    n = 400

    async def burst() -> list[bool]:
        publisher = Publisher(settings)
        try:
            return await asyncio.gather(*(publisher.publish(uuid.uuid4()) for _ in range(n)))
        finally:
            await publisher.aclose()

    client = redis.Redis.from_url(server_urls["redis"])
    try:
        sent = asyncio.run(burst())
        assert sent.count(False) == 0
        assert client.llen(queue) == n
    finally:
        client.delete(queue)
        client.close()
