"""What an attempt writes to its query's event log, against a real Redis: coalesced deltas in order, the
opening events first, and appends that never fail the query when Redis is gone."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from shared.config import Settings
from shared.events import EventLog, EventType
from shared.repositories.queries_asyncpg import Claim
from worker.streaming import DeltaSink

pytestmark = pytest.mark.anyio


@pytest.fixture
async def log(server_urls: dict[str, str]) -> AsyncIterator[EventLog]:
    client = aioredis.Redis.from_url(server_urls["redis"], socket_timeout=2)
    yield EventLog(client, Settings(redis_url=server_urls["redis"], queue_name=f"aiq.t.{uuid.uuid4().hex[:6]}"))
    await client.aclose()


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
    assert await log.append_quietly(uuid.uuid4(), EventType.COMPLETED, {}) is None
    await client.aclose()
