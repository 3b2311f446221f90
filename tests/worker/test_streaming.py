"""What an attempt writes to its query's event log, against a real Redis: coalesced deltas in order, the
opening events first, the text left when the stream ended riding with the attempt's end, and appends that
never fail the query when Redis is gone."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from shared.config import Settings
from shared.events import EventLog, EventType, wake_channel
from shared.repositories.queries_asyncpg import Claim
from shared.scriptbatch import ScriptBatch
from worker.streaming import DeltaSink

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(server_urls: dict[str, str]) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.Redis.from_url(server_urls["redis"], socket_timeout=2)
    yield redis
    await redis.aclose()


@pytest.fixture
def settings(server_urls: dict[str, str]) -> Settings:
    return Settings(redis_url=server_urls["redis"], queue_name=f"aiq.t.{uuid.uuid4().hex[:6]}")


@pytest.fixture
def log(client: aioredis.Redis, settings: Settings) -> EventLog:
    return EventLog(client, settings)


async def _heard(pubsub: PubSub, seconds: float = 0.5) -> list[str]:
    """The wake-up notices heard within `seconds`."""
    notices = []
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if message is not None:
            notices.append(message["data"].decode())
    return notices


def _claim(attempt: int = 1) -> Claim:
    return Claim(uuid.uuid4(), attempt, "prompt", None, "sim-small", None, None)


async def test_deltas_are_coalesced_in_order_after_the_opening_events(log: EventLog) -> None:
    claim = _claim(attempt=2)
    # The story's start, as the API appends it on submit (a log without it reads as one lost mid-story).
    await log.append(claim.query_id, EventType.QUEUED, {})
    sink = DeltaSink(log, claim, interval_s=0.05)
    pieces = [f"w{i} " for i in range(200)]
    for piece in pieces:
        sink.push(piece)
        await asyncio.sleep(0.001)
    await sink.close()
    await sink.flush()
    events = await log.since(claim.query_id, 1)
    assert [e.type for e in events[:2]] == [EventType.ATTEMPT_RESTARTED, EventType.STARTED]
    assert events[0].data == {"previous_attempt": 1}
    deltas = events[2:]
    assert {e.type for e in deltas} == {EventType.DELTA}
    assert "".join(e.data["text"] for e in deltas) == "".join(pieces)
    # ~0.2 s of pieces at one append per 50 ms: a handful of appends, not 200.
    assert 2 <= len(deltas) <= 20, len(deltas)
    assert [e.seq for e in events] == list(range(2, len(events) + 2))
    assert all(e.attempt == 2 for e in events)


async def test_an_attempt_without_text_still_opens_before_it_ends(log: EventLog) -> None:
    claim = _claim()
    sink = DeltaSink(log, claim, interval_s=0.02)
    await sink.close()
    assert [e.type for e in await log.since(claim.query_id, 0)] == [EventType.STARTED]


async def test_redis_down_never_fails_the_attempt() -> None:
    # Nothing listens on this port: every append fails, quietly.
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.5, socket_connect_timeout=0.5)
    log = EventLog(client, Settings(queue_name="aiq.t.down"))
    sink = DeltaSink(log, _claim(), interval_s=0.01)
    sink.push("text")
    await sink.close()
    await sink.flush()
    sink.push("more")
    sink.end()
    await sink.close()
    await sink.flush()
    assert await log.append_quietly(uuid.uuid4(), EventType.COMPLETED, {}) is None
    await client.aclose()


async def test_a_one_read_answer_rides_with_the_end_in_order_with_one_notice(
    client: aioredis.Redis, settings: Settings, log: EventLog
) -> None:
    claim = _claim()
    await log.append(claim.query_id, EventType.QUEUED, {}, notify=False)
    await log.since(claim.query_id, 0, mark=True)  # a stream follows the query: its events are told
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(wake_channel(settings))
    sink = DeltaSink(log, claim, interval_s=0.02)
    # As a short streamed answer arrives: its only piece and the end of the stream in one read (one loop turn).
    sink.push("the whole answer")
    sink.end()
    await sink.close()
    # Nothing went out on its own but `started`: the text waits for the attempt's end.
    assert [e.type for e in await log.since(claim.query_id, 0)] == [EventType.QUEUED, EventType.STARTED]
    batch = ScriptBatch(client)
    delta = sink.rest_in(batch, notify=False)
    end = log.append_in(batch, claim.query_id, EventType.COMPLETED, {}, claim.attempt)
    results = await batch.run()
    assert (delta, end, results) == (0, 1, [3, 4])
    events = await log.since(claim.query_id, 0)
    assert [e.type for e in events] == [EventType.QUEUED, EventType.STARTED, EventType.DELTA, EventType.COMPLETED]
    assert events[2].data == {"text": "the whole answer"}
    # One wake-up notice for `started`, one for the end: the delta's readers are woken by the end's.
    notices = await _heard(pubsub)
    assert notices == [f"{claim.query_id} started", f"{claim.query_id} completed"]
    # Nothing is left for a flush.
    await sink.flush()
    assert len(await log.since(claim.query_id, 0)) == 4
    await pubsub.aclose()


async def test_a_stream_that_goes_on_sends_its_first_piece_at_once(log: EventLog) -> None:
    claim = _claim()
    sink = DeltaSink(log, claim, interval_s=10)
    sink.push("first")
    # The stream goes back to the network: the first piece goes out now, not after the coalescing pause.
    await asyncio.sleep(0.2)
    assert [(e.type, e.data) for e in await log.since(claim.query_id, 0)] == [
        (EventType.STARTED, {}),
        (EventType.DELTA, {"text": "first"}),
    ]
    # Later pieces wait for the pause; the stream's end cuts it short and leaves them for the attempt's end.
    sink.push("second ")
    sink.push("third")
    sink.end()
    await asyncio.wait_for(sink.close(), 1)
    assert len(await log.since(claim.query_id, 0)) == 2
    # An end that tells nothing (e.g. a lost lease) leaves them to `flush`, still in order.
    await sink.flush()
    events = await log.since(claim.query_id, 0)
    assert [e.data.get("text") for e in events] == [None, "first", "second third"]


async def test_only_an_end_or_a_followed_query_sends_a_notice(
    client: aioredis.Redis, settings: Settings, log: EventLog
) -> None:
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(wake_channel(settings))
    query_id, other_id = uuid.uuid4(), uuid.uuid4()
    await log.append(query_id, EventType.QUEUED, {}, notify=False)
    # Nobody follows yet: these go to the log without a notice.
    await log.append(query_id, EventType.STARTED, {}, 1)
    await log.append(query_id, EventType.DELTA, {"text": "a"}, 1)
    # A follower's read marks the query and sees what came before the mark.
    seen = await log.since(query_id, 0, mark=True)
    assert [e.type for e in seen] == [EventType.QUEUED, EventType.STARTED, EventType.DELTA]
    assert 0 < await client.ttl(f"aiq:{settings.queue_name}:ev:{query_id}:follow") <= 90
    await log.append(query_id, EventType.DELTA, {"text": "b"}, 1)
    await log.append(query_id, EventType.COMPLETED, {}, 1)
    # An end always tells (long-polls wait for it), followed or not.
    await log.append(other_id, EventType.STARTED, {}, 1)
    await log.append(other_id, EventType.FAILED, {"code": "x"}, 1)
    notices = await _heard(pubsub)
    await pubsub.aclose()
    assert notices == [f"{query_id} delta", f"{query_id} completed", f"{other_id} failed"]
    # Forgetting the query forgets its mark.
    await log.discard(query_id)
    assert await client.exists(f"aiq:{settings.queue_name}:ev:{query_id}:follow") == 0
