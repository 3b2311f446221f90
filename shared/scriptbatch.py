"""Several registered Lua scripts run in one Redis round trip.

A query's end touches three features' keys on the one Redis (its token reservation, the response cache's
intent, its event log); each is one script, and sent one by one they cost three round trips. A batch sends
their EVALSHAs in one non-transactional pipeline. redis-py's own pipelined scripts would add a
`SCRIPT EXISTS` round trip to every batch; here a script Redis does not know (after a Redis restart) fails
alone with NOSCRIPT and is run again on its own, which loads it (a script that was refused never ran).

A batch can also ride in another client's pipeline to the same Redis, ahead of that client's own commands
(`queue_on`, then `settle` with the pipeline's results for it): a new query's `queued` event goes with its
Celery message this way (`shared/queue.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError


class ScriptBatch:
    """Calls queued with `add`, sent together by `run`; each call's result in the order added, also kept in
    `results` once the batch has run (the error that lost Redis for every call, if that happened)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._calls: list[tuple[AsyncScript, Sequence[Any], Sequence[Any]]] = []
        self.results: list[Any] = []

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
        self.queue_on(pipe)
        try:
            results: list[Any] = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            self.lost(exc)
            raise
        return await self.settle(results)

    def queue_on(self, pipe: Pipeline) -> None:
        """Queue the calls on a pipeline to the same Redis (another client's), ahead of what it sends next."""
        for script, keys, args in self._calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)

    def lost(self, exc: BaseException) -> None:
        """The pipeline that carried the calls failed as a whole: each call's result is that error."""
        self.results = [exc] * len(self._calls)

    async def settle(self, results: list[Any]) -> list[Any]:
        """The calls' results from the pipeline that carried them; a script Redis did not know is run again
        on its own, which loads it (that call's failure is then its result)."""
        for i, result in enumerate(results):
            if isinstance(result, NoScriptError):
                script, keys, args = self._calls[i]
                try:
                    results[i] = await script(keys=keys, args=args)
                except (RedisError, OSError) as exc:
                    results[i] = exc
        self.results = results
        return results
