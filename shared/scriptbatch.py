"""Several registered Lua scripts run in one Redis round trip.

A query's end touches three features' keys on the one Redis (its token reservation, the response cache's
intent, its event log); each is one script, and sent one by one they cost three round trips. A batch sends
their EVALSHAs in one non-transactional pipeline. redis-py's own pipelined scripts would add a
`SCRIPT EXISTS` round trip to every batch; here a script Redis does not know (after a Redis restart) fails
alone with NOSCRIPT and is run again on its own, which loads it (a script that was refused never ran).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError


class ScriptBatch:
    """Calls queued with `add`, sent together by `run`; each call's result in the order added."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._calls: list[tuple[AsyncScript, Sequence[Any], Sequence[Any]]] = []

    def add(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> int:
        """Queue one script call; returns the index of its result."""
        self._calls.append((script, keys, args))
        return len(self._calls) - 1

    def __len__(self) -> int:
        return len(self._calls)

    async def run(self) -> list[Any]:
        """Send every call in one round trip. A call's own error (e.g. a script error) is its result; losing
        Redis raises (RedisError or OSError), as a single call would."""
        if not self._calls:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for script, keys, args in self._calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        for i, result in enumerate(results):
            if isinstance(result, NoScriptError):
                script, keys, args = self._calls[i]
                try:
                    results[i] = await script(keys=keys, args=args)
                except ResponseError as exc:
                    results[i] = exc
        return results
