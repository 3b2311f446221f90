"""The opt-in response cache: an identical request (model, system, query, a conversation's earlier turns,
temperature, max_tokens) is answered from Redis at submit, without a provider call, a worker or the token budget.

Best effort by design: Redis unreachable or a wiped cache means a miss, never an error. The API decides
everything at submit (whether a query uses the cache, its scope, the TTL); the worker only carries out the
intent the API left for a cache-enabled miss. Prompt text never reaches a log or a key name: keys carry a
SHA-256 of the request's canonical JSON. Two identical requests that miss at the same moment both call the
provider (no single-flight); the later answer overwrites the earlier.

Keys, under `aiq:{QUEUE_NAME}:cache:`:
- `global:{sha256}` or `user:{user id}:{sha256}`: a cached answer (JSON of the text and the usage), for
  RESPONSE_CACHE_TTL_SECONDS.
- `intent:{query id}`: set for a cache-enabled miss: `{ttl}|{answer key}`; the worker that completes the
  query stores the answer there and deletes the intent (it lapses after `INTENT_TTL_SECONDS` otherwise). The
  worker's store rides in the batch that ends the query (`store_in`), so a query without an intent costs no
  round trip of its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.config import CacheScope, Settings
from shared.db import per_redis_client
from shared.metrics import RESPONSE_CACHE_LOOKUPS
from shared.scriptbatch import ScriptBatch

log = logging.getLogger(__name__)

# How long a cache-enabled query may take to complete and still fill the cache.
INTENT_TTL_SECONDS = 24 * 3600

# KEYS[1]: the intent. ARGV[1]: the answer's JSON. Stores it under the key the intent names; 1 if stored.
_STORE = """
local intent = redis.call('GET', KEYS[1])
if not intent then return 0 end
redis.call('DEL', KEYS[1])
local sep = string.find(intent, '|', 1, true)
redis.call('SET', string.sub(intent, sep + 1), ARGV[1], 'EX', tonumber(string.sub(intent, 1, sep - 1)))
return 1
"""


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """What a hit copies into the new row."""

    response: str
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None


def request_digest(
    model: str,
    system: str | None,
    prompt: str,
    temperature: float | None,
    max_tokens: int | None,
    history: list[dict[str, str]] | None = None,
    prompt_name: str | None = None,
) -> str:
    """SHA-256 of the canonical JSON of what makes two requests identical. A conversation's earlier turns and its
    final message's participant name are part of it; a single prompt's digest has neither key (the digest it had
    before conversations)."""
    request: dict[str, Any] = {
        "model": model,
        "system": system,
        "prompt": prompt,
        "temperature": temperature,
        "max_tokens": max_tokens,
    }
    if history is not None:
        request["history"] = history
    if prompt_name is not None:
        request["prompt_name"] = prompt_name
    canonical = json.dumps(
        request,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache:
    """The cache on one Redis client (see `response_cache_for`)."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._prefix = f"aiq:{settings.queue_name}:cache:"
        self._store = redis.register_script(_STORE)

    def wanted(self, requested: bool | None) -> bool:
        """A query's `cache` field, or the server's default when it sets none."""
        return self._settings.response_cache_default if requested is None else requested

    def answer_key(self, user_id: uuid.UUID, row: dict[str, Any]) -> str:
        """Where the answer to this request lives, in the configured scope."""
        digest = request_digest(
            row["model"],
            row["system"],
            row["prompt"],
            row["temperature"],
            row["max_tokens"],
            row["history"],
            row["prompt_name"],
        )
        if self._settings.response_cache_scope is CacheScope.GLOBAL:
            return f"{self._prefix}global:{digest}"
        return f"{self._prefix}user:{user_id}:{digest}"

    async def lookup(self, key: str) -> CachedAnswer | None:
        """The cached answer, or None for a miss (Redis unreachable and unreadable entries are misses)."""
        try:
            raw = await self._redis.get(key)
        except RedisError as exc:
            log.warning("response cache unavailable: treated as a miss", extra={"error": type(exc).__name__})
            raw = None
        answer = _parse(raw) if raw is not None else None
        RESPONSE_CACHE_LOOKUPS.labels(result="hit" if answer is not None else "miss").inc()
        return answer

    async def expect(self, query_id: uuid.UUID, key: str) -> None:
        """Leave the intent for the worker: when this query completes, cache its answer under `key`."""
        intent = f"{self._settings.response_cache_ttl_seconds}|{key}"
        try:
            await self._redis.set(f"{self._prefix}intent:{query_id}", intent, ex=INTENT_TTL_SECONDS)
        except RedisError as exc:
            log.warning("response cache unavailable: answer will not be cached", extra={"error": type(exc).__name__})

    async def forget_user(self, user_id: uuid.UUID) -> None:
        """Drop a deleted account's per-user answers (a SCAN: account deletion is rare); with Redis down they
        lapse with their TTL. Global-scope answers belong to no one and stay."""
        try:
            batch: list[bytes | str] = []
            async for key in self._redis.scan_iter(match=f"{self._prefix}user:{user_id}:*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    await self._redis.delete(*batch)
                    batch.clear()
            if batch:
                await self._redis.delete(*batch)
        except RedisError as exc:
            log.warning("response cache unavailable: answers not forgotten", extra={"error": type(exc).__name__})

    def store_in(self, batch: ScriptBatch, query_id: uuid.UUID, answer: CachedAnswer) -> int:
        """`store` queued on a batch: for a query that did not ask for the cache it finds no intent and does
        nothing, at no round trip of its own. The index of its result (1 if stored)."""
        return batch.add(self._store, [f"{self._prefix}intent:{query_id}"], [_dumps(answer)])

    async def store(self, query_id: uuid.UUID, answer: CachedAnswer) -> bool:
        """After a completion write: cache the answer if its query asked for it; True if stored."""
        try:
            stored = await self._store(keys=[f"{self._prefix}intent:{query_id}"], args=[_dumps(answer)])
        except RedisError as exc:
            log.warning("response cache unavailable: answer not cached", extra={"error": type(exc).__name__})
            return False
        return bool(stored)


def _dumps(answer: CachedAnswer) -> bytes:
    # Runs for every completion (the intent is only looked at in Redis): orjson, without `asdict`'s copy.
    return orjson.dumps(
        {
            "response": answer.response,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.total_tokens,
        }
    )


def _parse(raw: bytes | str) -> CachedAnswer | None:
    try:
        data = json.loads(raw)
        return CachedAnswer(
            response=str(data["response"]),
            prompt_tokens=data["prompt_tokens"],
            completion_tokens=data["completion_tokens"],
            total_tokens=data["total_tokens"],
        )
    except (ValueError, TypeError, KeyError):
        log.warning("unreadable response cache entry: treated as a miss")
        return None


# The process's ResponseCache on a Redis client: its scripts are registered once, not per request.
response_cache_for = per_redis_client(ResponseCache)
