"""kombu's Redis channel with AIQ's adjustments (worker/broker.py), against a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection

from shared.config import Settings
from worker.broker import guard_dead_channel, reuse_sync_client


@pytest.fixture
def channel(server_urls: dict[str, str]) -> Iterator[Any]:
    guard_dead_channel(Settings())
    reuse_sync_client(Settings())
    # Kombu's spelling of the URL (an embedded Redis listens on a unix socket).
    with Connection(Settings(redis_url=server_urls["redis"]).broker_url) as conn:  # type: ignore[arg-type]
        ch = conn.channel()
        try:
            yield ch
        finally:
            ch.close()


def test_one_sync_client_per_pool_and_a_new_one_after_a_reconnect(channel: Any) -> None:
    with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
        assert first is second
        assert first.connection_pool is channel.pool
    given = object()
    with channel.conn_or_acquire(given) as passed:
        assert passed is given
    channel._disconnect_pools()  # what a broker reconnect does to the channel's pools
    with channel.conn_or_acquire() as after:
        assert after is not first
        assert after.connection_pool is channel.pool


def test_acks_late_bookkeeping_still_lands_in_redis(channel: Any) -> None:
    queue = f"aiq.test.broker.{uuid.uuid4().hex[:8]}"
    channel.queue_declare(queue)
    channel.basic_publish(channel.prepare_message("hello"), "", queue)
    message = channel.basic_get(queue, no_ack=False)
    assert message is not None
    with channel.conn_or_acquire() as client:
        assert client.hexists(channel.unacked_key, message.delivery_tag)
        message.ack()
        assert not client.hexists(channel.unacked_key, message.delivery_tag)
        client.delete(queue)
