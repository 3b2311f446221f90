"""The submit's limits script reading an access token's revocation state (shared/revocation.py `GUARD_LUA`, the
`guard` of shared/limits.py `take_submit`), on the real Redis: it takes only for a token the full check would pass."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from shared import revocation
from shared.config import Settings
from shared.limits import Limiter, Limits

pytestmark = pytest.mark.anyio

ISSUED_AT = 1_800_000_000.25
LIMITS = Limits(requests_per_minute=1000, max_pending=1000, token_budget=10**9, token_window_seconds=3600)


QUEUE = f"guard-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def limiter(redis: aioredis.Redis, server_urls: dict[str, str]) -> Limiter:
    return Limiter(redis, Settings(queue_name=QUEUE, redis_url=server_urls["redis"]))


async def _take(limiter: Limiter, user_id: uuid.UUID, guard: revocation.Guard) -> bool:
    """True if the script took the limits, False if it left the decision to the full check (and took nothing)."""
    try:
        await limiter.take_submit(user_id, uuid.uuid4(), LIMITS, 10, guard=guard)
    except revocation.CheckNeeded:
        return False
    return True


async def _pending(redis: aioredis.Redis, user_id: uuid.UUID) -> int:
    return int(await redis.zcard(f"aiq:{QUEUE}:lim:pending:{user_id}"))


async def test_the_guard_takes_only_for_a_token_that_the_full_check_would_let_in(
    redis: aioredis.Redis, limiter: Limiter
) -> None:
    user_id, jti, family = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    keys = [revocation.user_key(user_id), revocation.jti_key(jti), revocation.family_key(family)]
    guard = revocation.Guard(keys, ISSUED_AT)
    try:
        # The user's state not cached: unsure, whatever the markers say.
        assert not await _take(limiter, user_id, guard)
        await redis.set(keys[0], revocation.UserState(False, None).encode())
        assert await _take(limiter, user_id, guard)
        taken = await _pending(redis, user_id)
        assert taken == 1

        # A logged-out token, then a revoked family: refused before anything is taken.
        await redis.set(keys[1], "1")
        assert not await _take(limiter, user_id, guard)
        await redis.delete(keys[1])
        await redis.set(keys[2], "1")
        assert not await _take(limiter, user_id, guard)
        await redis.delete(keys[2])
        assert await _pending(redis, user_id) == taken

        # Disabled; then "sessions valid after" just after, at and just before the token's issue time.
        await redis.set(keys[0], revocation.DISABLED)
        assert not await _take(limiter, user_id, guard)
        for after, clear in ((ISSUED_AT + 0.001, False), (ISSUED_AT, False), (ISSUED_AT - 0.5, True)):
            await redis.set(keys[0], f"ok:{after:.6f}")
            assert await _take(limiter, user_id, guard) is clear, after
        assert await _pending(redis, user_id) == taken + 1
    finally:
        await redis.delete(*keys)


async def test_limits_switched_off_leave_the_check_to_the_full_one(limiter: Limiter) -> None:
    user_id = uuid.uuid4()
    guard = revocation.Guard([revocation.user_key(user_id), revocation.jti_key(uuid.uuid4())], ISSUED_AT)
    off = Limits(requests_per_minute=0, max_pending=0, token_budget=0, token_window_seconds=3600)
    with pytest.raises(revocation.CheckNeeded):
        await limiter.take_submit(user_id, uuid.uuid4(), off, 10, guard=guard)
