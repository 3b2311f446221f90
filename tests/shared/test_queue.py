"""The API's direct publish writes exactly what Celery's own send_task writes."""

from __future__ import annotations

import base64
import json
import uuid

import redis

from shared.config import Settings
from shared.queue import Publisher, encode_task_message


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
