"""kombu's Redis channel with AIQ's adjustments (worker/broker.py), against a real Redis."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection

from shared.config import Settings
from shared.queue import celery_config
from worker.broker import guard_dead_channel, reuse_sync_client


@pytest.fixture
def channel(server_urls: dict[str, str]) -> Iterator[Any]:
    guard_dead_channel(Settings())
    reuse_sync_client(Settings())
    # Kombu's spelling of the URL (an embedded Redis listens on a unix socket).
    settings = Settings(redis_url=server_urls["redis"])  # type: ignore[arg-type]
    # The worker's transport options (shared/queue.py), as Celery passes them.
    with Connection(settings.broker_url, transport_options=celery_config(settings)["broker_transport_options"]) as conn:
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


def test_unacked_messages_live_in_the_worker_and_go_back_on_the_list_when_the_channel_closes(channel: Any) -> None:
    queue = f"aiq.test.broker.{uuid.uuid4().hex[:8]}"
    channel.queue_declare(queue)
    channel.basic_publish(channel.prepare_message("acked"), "", queue)
    channel.basic_publish(channel.prepare_message("held"), "", queue)
    acked = channel.basic_get(queue, no_ack=False)
    held = channel.basic_get(queue, no_ack=False)
    assert acked is not None
    assert held is not None
    with channel.conn_or_acquire() as client:
        try:
            # No acknowledgement bookkeeping in Redis: the delivery costs its read alone.
            assert client.llen(queue) == 0
            assert not client.hexists(channel.unacked_key, held.delivery_tag)
            assert client.zscore(channel.unacked_index_key, held.delivery_tag) is None
            acked.ack()
            # A warm shutdown closes the channel: what was taken and never acked goes back on the list.
            channel.close()
            payloads = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
            assert [channel.decode_body(p["body"], p["properties"]["body_encoding"]) for p in payloads] == [b"held"]
        finally:
            client.delete(queue)
