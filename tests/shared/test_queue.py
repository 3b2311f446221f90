"""The API's direct publish writes exactly what Celery's own send_task writes."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from typing import Any

import redis
from kombu import Connection

from shared.config import Settings
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
