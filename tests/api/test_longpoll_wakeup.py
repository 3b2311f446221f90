"""The one wake-up: a long-poll returns when the query ends, woken across API processes by the Redis notice,
and a Redis restart costs at most a bounded re-read, never a lost answer."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.engine import Engine

from bench.chaos.services import OwnRedis
from shared.config import Settings
from shared.db import make_raw_pool
from shared.events import EventLog, EventType
from shared.services.queries import wait_for_query
from shared.wakeup import Wakeup
from tests.support.db import insert_query, insert_user, row
from tests.support.stack import Stack, spawn_api, stop, wake_notices


def test_a_query_nobody_streams_sends_one_notice_its_end(
    client: httpx.Client, stack: Stack, user: dict[str, Any]
) -> None:
    # Every API process reads every notice: a long-polled query's `started` and deltas would wake them all for
    # nothing. Only its end goes out (a stream that follows a query marks it and hears the rest).
    with wake_notices(stack) as heard:
        submitted = client.post(
            "/api/v1/query", json={"query": f"[[sim chunk_ms=30]] unfollowed {uuid.uuid4()}"}, headers=user["headers"]
        )
        assert submitted.status_code == 202
        query_id = submitted.json()["query_id"]
        body = client.get(f"/api/v1/query/{query_id}", params={"wait": 20}, headers=user["headers"]).json()
        assert body["status"] == "completed"
        notices = heard(query_id)
    # A slow stream of several chunks: `started` and several deltas were appended, none of them told.
    assert notices == ["completed"]


def test_long_poll_on_another_api_process_is_woken_right_after_the_end(
    client: httpx.Client, stack: Stack, user: dict[str, Any], db: Any, tmp_path: Path
) -> None:
    # Submitted through the session's API, waited for on a second one: only the Redis notice connects them.
    api, url = spawn_api(stack, tmp_path / "api.log")
    try:
        ids = []
        for _ in range(4):
            r = client.post(
                "/api/v1/query", json={"query": f"[[sim latency_ms=1600]] wake {uuid.uuid4()}"}, headers=user["headers"]
            )
            assert r.status_code == 202
            ids.append(r.json()["query_id"])

        def long_poll(query_id: str) -> tuple[dict[str, Any], float]:
            with httpx.Client(base_url=url, timeout=30) as other:
                body = other.get(f"/api/v1/query/{query_id}", params={"wait": 20}, headers=user["headers"]).json()
            return body, time.time()

        with ThreadPoolExecutor(len(ids)) as pool:
            results = list(pool.map(long_poll, ids))
    finally:
        stop(api)
    lags = []
    for query_id, (body, returned_at) in zip(ids, results, strict=True):
        assert body["status"] == "completed"
        finished = row(db, query_id)["finished_at"].astimezone(UTC).timestamp()
        lags.append(returned_at - finished)
    # A poll backing off to 1 s would see a 1.6 s query ~0.9 s late; the notice wakes it within milliseconds.
    # Generous bounds: the machine is shared and loaded.
    assert statistics.median(lags) < 0.3, lags
    assert max(lags) < 0.6, lags


@pytest.mark.anyio
async def test_wakeup_wakes_waiters_and_survives_a_redis_restart(tmp_path: Path) -> None:
    own = OwnRedis(tmp_path)
    own.start()
    settings = Settings(redis_url=own.url, queue_name=f"aiq.wake.{uuid.uuid4().hex[:6]}", wakeup_fallback_seconds=1)
    wakeup = Wakeup(settings)
    wakeup.start()
    client = aioredis.Redis.from_url(own.url, socket_timeout=2)
    log = EventLog(client, settings)
    query_id, other_id = uuid.uuid4(), uuid.uuid4()
    try:
        await asyncio.wait_for(wakeup.subscribed.wait(), 10)
        assert wakeup.timeout(30) == 30
        with (
            wakeup.watch(query_id) as any_event,
            wakeup.watch(query_id, only_terminal=True) as terminal_only,
            wakeup.watch(other_id) as unrelated,
        ):
            # A delta sends its notice only while a stream follows the query (its mark, set with a read).
            await log.append(query_id, EventType.DELTA, {"text": "unfollowed"}, 1)
            assert not await any_event.wait(0.3)
            await log.since(query_id, 0, mark=True)
            started = time.monotonic()
            await log.append(query_id, EventType.DELTA, {"text": "hi"}, 1)
            assert await any_event.wait(5)
            assert time.monotonic() - started < 1.0
            # A delta does not wake a waiter that only wants the end, nor another query's waiter.
            assert not await terminal_only.wait(0.3)
            assert not await unrelated.wait(0.01)
            await log.append(query_id, EventType.COMPLETED, {}, 1)
            assert await terminal_only.wait(5)

            # Redis goes away: every waiter is woken to re-read, and waits are capped at the fallback bound.
            own.shutdown_nosave()
            assert await unrelated.wait(10)
            assert not wakeup.connected
            assert wakeup.timeout(30) == 1
            # Back: the subscriber resubscribes and wakes everybody once more (notices sent meanwhile are lost).
            own.start()
            await asyncio.wait_for(wakeup.subscribed.wait(), 15)
            assert await unrelated.wait(5)
            assert wakeup.timeout(30) == 30
            # The mark went with the server; the new subscription tells followers to set it again.
            assert wakeup.generation == 2
            await client.connection_pool.disconnect()  # the test's own connection died with the server
            await log.since(query_id, 0, mark=True)
            await log.append(query_id, EventType.DELTA, {"text": "again"}, 2)
            assert await any_event.wait(5)
    finally:
        await wakeup.stop()
        await client.aclose()
        own.close()


class _CountedPool:
    """The pool, counting the connections taken from it: one per read of the query."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.taken = 0

    def acquire(self) -> Any:
        self.taken += 1
        return self.pool.acquire()


@pytest.mark.anyio
async def test_a_wait_watching_since_before_the_publish_reads_once_after_the_end(
    repo_db: Engine, repo_database_url: str, server_urls: dict[str, str]
) -> None:
    # A `/v1` call watches its new query before publishing it: nothing can end the query before that, so
    # there is nothing to read until the end's notice, and then one read.
    settings = Settings(
        database_url=repo_database_url, redis_url=server_urls["redis"], queue_name=f"aiq.once.{uuid.uuid4().hex[:6]}"
    )
    user_id = insert_user(repo_db)
    query_id = insert_query(repo_db, user_id)
    wakeup = Wakeup(settings)
    wakeup.start()
    client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=2)
    pool = _CountedPool(await make_raw_pool(settings, "aiq-tests"))
    try:
        await asyncio.wait_for(wakeup.subscribed.wait(), 10)
        with wakeup.watch(uuid.UUID(query_id), only_terminal=True) as watching:
            waiting = asyncio.create_task(
                wait_for_query(pool, uuid.UUID(user_id), uuid.UUID(query_id), 20, wakeup, watching=watching)
            )
            await asyncio.sleep(0.5)
            assert not waiting.done()
            assert pool.taken == 0
            with repo_db.begin() as conn:
                conn.execute(text("UPDATE queries SET status = 'completed', response = 'done' WHERE id = :id"),
                             {"id": query_id})  # fmt: skip
            await EventLog(client, settings).append(uuid.UUID(query_id), EventType.COMPLETED, {}, 1)
            answered = await asyncio.wait_for(waiting, 5)
        assert answered.status == "completed"
        assert answered.response == "done"
        assert pool.taken == 1
        # Without a notice it reads once, at the deadline, and answers the query as it stands.
        pending_id = insert_query(repo_db, user_id)
        with wakeup.watch(uuid.UUID(pending_id), only_terminal=True) as watching:
            still = await wait_for_query(
                pool, uuid.UUID(user_id), uuid.UUID(pending_id), 0.3, wakeup, watching=watching
            )
        assert still.status == "pending"
        assert pool.taken == 2
    finally:
        await wakeup.stop()
        await client.aclose()
        await pool.pool.close()
