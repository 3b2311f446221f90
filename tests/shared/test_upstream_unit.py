"""The upstream budget's parts: header and limit parsing (pure), and its Lua scripts on a real Redis."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from shared.config import Settings, parse_upstream_limits
from shared.llm import RateLimitInfo, parse_duration, parse_ratelimit_headers
from shared.scriptbatch import ScriptBatch
from shared.upstream import Grant, Refusal, UpstreamBudget, jittered

MODEL = "m-test"


def test_go_durations_and_plain_seconds_parse() -> None:
    assert parse_duration("1s") == 1
    assert parse_duration("6m0s") == 360
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1h2m3.5s") == pytest.approx(3723.5)
    assert parse_duration("0.5") == 0.5
    assert parse_duration("") is None
    assert parse_duration("soon") is None
    assert parse_duration("1s garbage") is None


def test_ratelimit_headers_are_read_as_openai_sends_them() -> None:
    headers = httpx.Headers(
        {
            "x-ratelimit-limit-requests": "3000",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-requests": "2999",
            "x-ratelimit-remaining-tokens": "149000",
            "x-ratelimit-reset-requests": "20ms",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    info = parse_ratelimit_headers(headers)
    assert info == RateLimitInfo(3000, 150000, 2999, 149000, 0.02, 360.0)
    assert parse_ratelimit_headers(httpx.Headers({"content-type": "application/json"})) is None
    # A garbled number is ignored, not an error.
    assert parse_ratelimit_headers(httpx.Headers({"x-ratelimit-limit-requests": "many"})) is None


def test_upstream_limits_parse_compact_and_json_and_refuse_nonsense() -> None:
    assert parse_upstream_limits("gpt-4o=rpm:3000,tpm:90000;*=concurrency:8") == {
        "gpt-4o": {"rpm": 3000, "tpm": 90000},
        "*": {"concurrency": 8},
    }
    assert parse_upstream_limits('{"gpt-4o": {"rpm": 10}}') == {"gpt-4o": {"rpm": 10}}
    assert parse_upstream_limits(" ") == {}
    for bad in ("gpt-4o", "gpt-4o=rpm", "gpt-4o=speed:3", "gpt-4o=rpm:-1", '{"m": {"rpm": "x"}}'):
        with pytest.raises(ValueError):
            parse_upstream_limits(bad)
    with pytest.raises(ValueError):
        Settings(upstream_limits="gpt-4o=bogus:1")


def test_jitter_spreads_waiters_but_never_wakes_them_early() -> None:
    rng = random.Random(7)
    waits = [jittered(2000, rng) for _ in range(200)]
    assert min(waits) >= 2.0
    assert max(waits) <= 3.0
    assert max(waits) - min(waits) > 0.3


@pytest.fixture
async def redis_client(server_urls: dict[str, str]) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server_urls["redis"])
    yield client
    await client.aclose()


def _budget(client: aioredis.Redis, server_urls: dict[str, str], **settings: Any) -> UpstreamBudget:
    values: dict[str, Any] = {
        "redis_url": server_urls["redis"],
        "queue_name": f"aiq.test.up.{uuid.uuid4().hex[:8]}",
        "jwt_secret_key": "k" * 48,
        "upstream_probe_concurrency": 2,
        **settings,
    }
    return UpstreamBudget(client, Settings(**values))


async def _first_answer(budget: UpstreamBudget) -> None:
    """One call answered without headers: the model is no longer unknown (no probing)."""
    grant = await budget.acquire(MODEL, 1)
    assert isinstance(grant, Grant)
    assert grant.learning
    await budget.settle(grant, used_tokens=0, answered=True)


async def _wipe(client: aioredis.Redis, budget: UpstreamBudget) -> None:
    """What a Redis restart does to the budget: every key of the namespace gone (never FLUSHDB here)."""
    await client.delete(*budget.keys(MODEL))


@pytest.mark.anyio
async def test_configured_requests_per_minute_grant_a_burst_then_say_how_long_to_wait(
    redis_client: aioredis.Redis, server_urls: dict[str, str]
) -> None:
    budget = _budget(redis_client, server_urls, upstream_limits={MODEL: {"rpm": 60}})
    await _first_answer(budget)
    grants = [await budget.acquire(MODEL, 10) for _ in range(59)]
    assert all(isinstance(g, Grant) for g in grants)
    refusal = await budget.acquire(MODEL, 10)
    assert isinstance(refusal, Refusal)
    assert refusal.reason == "requests"
    # One request comes back every second; the jitter adds at most a quarter of the wait (+20 ms).
    assert 0.5 <= refusal.wait_seconds <= 1.3


@pytest.mark.anyio
async def test_tokens_reserved_then_settled_with_usage_after_failure_and_cancel(
    redis_client: aioredis.Redis, server_urls: dict[str, str]
) -> None:
    budget = _budget(redis_client, server_urls, upstream_limits={MODEL: {"tpm": 1000, "concurrency": 5}})
    await _first_answer(budget)
    first = await budget.acquire(MODEL, 600)
    assert isinstance(first, Grant)
    assert first.reserved_tokens == 600
    assert first.slot
    refused = await budget.acquire(MODEL, 600)
    assert isinstance(refused, Refusal)
    assert refused.reason == "tokens"
    # The provider refused the call (an error answer): the whole reservation comes back.
    await budget.settle(first, used_tokens=0)
    second = await budget.acquire(MODEL, 600)
    assert isinstance(second, Grant)
    # Cancelled mid-call: the provider counted it on arrival, so the reservation stands; the slot frees.
    await budget.settle(second, used_tokens=None)
    assert await redis_client.zcard(budget.keys(MODEL)[2]) == 0
    assert isinstance(await budget.acquire(MODEL, 600), Refusal)
    level = float(await redis_client.hget(budget.keys(MODEL)[1], "l") or 0)
    assert level < 420


@pytest.mark.anyio
async def test_calls_in_flight_are_capped_and_a_dead_workers_slot_expires(
    redis_client: aioredis.Redis, server_urls: dict[str, str]
) -> None:
    budget = _budget(redis_client, server_urls, upstream_limits={MODEL: {"concurrency": 2}}, llm_timeout_seconds=0.1)
    await _first_answer(budget)
    a, b = await budget.acquire(MODEL, 1), await budget.acquire(MODEL, 1)
    assert isinstance(a, Grant)
    assert isinstance(b, Grant)
    third = await budget.acquire(MODEL, 1)
    assert isinstance(third, Refusal)
    assert third.reason == "concurrency"
    await budget.settle(a, used_tokens=1)
    replacement = await budget.acquire(MODEL, 1)
    assert isinstance(replacement, Grant)
    # A settle that rides in a query end's batch (one round trip with the end's other scripts) frees the same.
    batch = ScriptBatch(redis_client)
    assert budget.settle_in(batch, replacement, used_tokens=1, answered=True) == 0
    assert budget.settle_in(batch, Grant(MODEL, "", 0, offline=True), used_tokens=1) is None
    assert len(await batch.run()) == 1
    assert isinstance(await budget.acquire(MODEL, 1), Grant)
    # Nobody settles `b` (its worker was SIGKILLed): its slot lapses after LLM_TIMEOUT_SECONDS + 5 s.
    await redis_client.zadd(budget.keys(MODEL)[2], {b.slot: 0})
    assert isinstance(await budget.acquire(MODEL, 1), Grant)


@pytest.mark.anyio
async def test_unknown_limits_probe_then_learn_from_headers_and_close_on_429(
    redis_client: aioredis.Redis, server_urls: dict[str, str]
) -> None:
    budget = _budget(redis_client, server_urls)
    probes = [await budget.acquire(MODEL, 100) for _ in range(2)]
    assert all(isinstance(g, Grant) and g.learning for g in probes)
    assert isinstance(await budget.acquire(MODEL, 100), Refusal)
    info = RateLimitInfo(limit_requests=120, limit_tokens=10_000, remaining_requests=3, remaining_tokens=9_000)
    assert isinstance(probes[0], Grant)
    await budget.settle(probes[0], used_tokens=100, ratelimit=info, answered=True)
    # Learned: 120 rpm, but the provider says only 3 requests are left, so only about 3 go now.
    assert await redis_client.hget(budget.keys(MODEL)[4], "rpm") == b"120"
    taken = 0
    while isinstance(await budget.acquire(MODEL, 100), Grant):
        taken += 1
        assert taken < 10
    assert 2 <= taken <= 4
    assert isinstance(probes[1], Grant)
    # A 429 closes the budget for its retry-after, whatever the buckets hold.
    await budget.settle(probes[1], used_tokens=0, answered=True, throttled_after=2.0, throttled_kind="requests")
    closed = await budget.acquire(MODEL, 1)
    assert isinstance(closed, Refusal)
    assert closed.reason == "closed"
    assert 1.5 <= closed.wait_seconds <= 3.1


@pytest.mark.anyio
async def test_after_redis_loses_the_state_the_budget_starts_conservative_and_relearns(
    redis_client: aioredis.Redis, server_urls: dict[str, str]
) -> None:
    budget = _budget(redis_client, server_urls)
    grant = await budget.acquire(MODEL, 1)
    assert isinstance(grant, Grant)
    await budget.settle(grant, used_tokens=1, ratelimit=RateLimitInfo(limit_requests=6000), answered=True)
    many = [await budget.acquire(MODEL, 1) for _ in range(20)]
    assert all(isinstance(g, Grant) and not g.learning for g in many)
    await _wipe(redis_client, budget)
    # Nothing known any more: back to UPSTREAM_PROBE_CONCURRENCY calls at once until an answer teaches.
    after = [await budget.acquire(MODEL, 1) for _ in range(3)]
    assert [isinstance(g, Grant) for g in after] == [True, True, False]
    first = after[0]
    assert isinstance(first, Grant)
    assert first.learning
    await budget.settle(first, used_tokens=1, ratelimit=RateLimitInfo(limit_requests=6000), answered=True)
    assert isinstance(await budget.acquire(MODEL, 1), Grant)


@pytest.mark.anyio
async def test_the_providers_burst_is_learned_from_its_reset_headers(
    redis_client: aioredis.Redis, server_urls: dict[str, str]
) -> None:
    budget = _budget(redis_client, server_urls)
    grant = await budget.acquire(MODEL, 1)
    assert isinstance(grant, Grant)
    # 600 rpm refills 10 a second: 5 left and 0.5 s to full means the provider holds a burst of 10, not 600.
    info = RateLimitInfo(limit_requests=600, remaining_requests=5, reset_requests=0.5)
    await budget.settle(grant, used_tokens=1, ratelimit=info, answered=True)
    assert await redis_client.hget(budget.keys(MODEL)[4], "rcap") == b"10"
    await redis_client.delete(budget.keys(MODEL)[0])
    granted = 0
    while isinstance(await budget.acquire(MODEL, 1), Grant):
        granted += 1
        assert granted <= 12
    assert granted >= 9


@pytest.mark.anyio
async def test_an_answer_without_headers_means_no_advertised_limit(
    redis_client: aioredis.Redis, server_urls: dict[str, str]
) -> None:
    budget = _budget(redis_client, server_urls)
    grant = await budget.acquire(MODEL, 1)
    assert isinstance(grant, Grant)
    assert grant.needs_settle()
    await budget.settle(grant, used_tokens=1, answered=True)
    later = [await budget.acquire(MODEL, 1) for _ in range(50)]
    # The idle path: granted, holding nothing, so the call needs no second round trip.
    assert all(isinstance(g, Grant) and not g.needs_settle() for g in later)


@pytest.mark.anyio
async def test_waiters_marker_makes_new_deliveries_queue_but_not_the_dispatcher(
    redis_client: aioredis.Redis, server_urls: dict[str, str]
) -> None:
    budget = _budget(redis_client, server_urls, upstream_limits={MODEL: {"rpm": 1000}})
    await _first_answer(budget)
    await budget.mark_waiting(MODEL, 5)
    fresh = await budget.acquire(MODEL, 1, fresh=True)
    assert isinstance(fresh, Refusal)
    assert fresh.reason == "queued"
    assert fresh.wait_seconds == 0
    assert isinstance(await budget.acquire(MODEL, 1), Grant)
    await budget.clear_waiting(MODEL)
    assert isinstance(await budget.acquire(MODEL, 1, fresh=True), Grant)


@pytest.mark.anyio
async def test_redis_down_fails_open(server_urls: dict[str, str]) -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    budget = _budget(dead, server_urls, upstream_limits={MODEL: {"rpm": 1}})
    grant = await budget.acquire(MODEL, 1)
    assert isinstance(grant, Grant)
    assert grant.offline
    assert not grant.needs_settle()
    await budget.settle(grant, used_tokens=1)
    await dead.aclose()


@pytest.mark.anyio
async def test_a_dry_look_takes_nothing(redis_client: aioredis.Redis, server_urls: dict[str, str]) -> None:
    budget = _budget(redis_client, server_urls, upstream_limits={MODEL: {"rpm": 60, "concurrency": 1}})
    await _first_answer(budget)
    looks = [await budget.acquire(MODEL, 1, dry=True) for _ in range(100)]
    assert all(isinstance(g, Grant) and not g.needs_settle() for g in looks)
    assert await redis_client.zcard(budget.keys(MODEL)[2]) == 0
    assert isinstance(await budget.acquire(MODEL, 1), Grant)
    assert isinstance(await budget.acquire(MODEL, 1, dry=True), Refusal)
