"""Several features' Lua scripts in one Redis round trip (shared/scriptbatch.py), on the real Redis."""

from __future__ import annotations

import os
import uuid

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared.scriptbatch import ScriptBatch

pytestmark = pytest.mark.anyio


def _key() -> str:
    return f"aiq:{os.environ.get('QUEUE_NAME', 'test')}:scriptbatch:{uuid.uuid4()}"


async def test_a_batch_runs_its_scripts_in_order_in_one_round_trip(redis: aioredis.Redis) -> None:
    incr = redis.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    get = redis.register_script("return redis.call('GET', KEYS[1])")
    key = _key()
    sent: list[int] = []
    real_execute = aioredis.client.Pipeline.execute

    async def counting_execute(self: aioredis.client.Pipeline, raise_on_error: bool = True) -> list[object]:
        sent.append(len(self.command_stack))
        return await real_execute(self, raise_on_error)

    await incr(keys=[key], args=[0])  # both scripts are known to Redis after this
    await get(keys=[key])
    batch = ScriptBatch(redis)
    assert (batch.add(incr, [key], [2]), batch.add(incr, [key], [3]), batch.add(get, [key], [])) == (0, 1, 2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aioredis.client.Pipeline, "execute", counting_execute)
        results = await batch.run()
    await redis.delete(key)

    assert results == [2, 5, b"5"]
    assert sent == [3]


async def test_a_script_redis_does_not_know_is_loaded_and_run_and_an_error_stays_its_own(
    redis: aioredis.Redis,
) -> None:
    # A fresh script body: its SHA is unknown to Redis, as after a Redis restart.
    unknown = redis.register_script(f"-- {uuid.uuid4()}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])")
    failing = redis.register_script(f"-- {uuid.uuid4()}\nreturn redis.error_reply('nope')")
    key = _key()
    batch = ScriptBatch(redis)
    batch.add(unknown, [key], [7])
    batch.add(failing, [], [])
    batch.add(unknown, [key], [1])

    results = await batch.run()
    await redis.delete(key)

    assert (results[0], results[2]) == (7, 8)
    assert isinstance(results[1], ResponseError)


async def test_an_empty_batch_sends_nothing(redis: aioredis.Redis) -> None:
    assert await ScriptBatch(redis).run() == []
