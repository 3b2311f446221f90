"""Per-user submit limits across API processes, on real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.engine import Engine

from shared.limits import Limiter, Limits
from tests.support.api import register_and_login, wait_terminal
from tests.support.db import insert_query, row
from tests.support.limits import key_prefix, limits_redis, make_admin, submit_in_parallel, tight_apis
from tests.support.polling import wait_until
from tests.support.stack import Stack, spawn_api, stop

# "hello" is 5 characters: ceil(5 / 4) = 2 prompt tokens, plus the output cap.
BODY = {"query": "hello", "max_tokens": 100}
RESERVED = 102


def _codes(responses: list[httpx.Response]) -> dict[Any, int]:
    counts: dict[Any, int] = {}
    for r in responses:
        key = r.status_code if r.status_code != 429 else r.json()["error"]["code"]
        counts[key] = counts.get(key, 0) + 1
    return counts


def _rows(db: Engine, user_id: str) -> tuple[int, int]:
    with db.connect() as conn:
        n, reserved = conn.execute(
            text("SELECT count(*), coalesce(sum(reserved_tokens), 0) FROM queries WHERE user_id = :u"),
            {"u": user_id},
        ).one()
    return int(n), int(reserved)


def test_token_budget_holds_for_200_parallel_submits_across_two_api_processes(
    stack: Stack, client: httpx.Client, user: dict[str, Any], db: Engine, tmp_path: Path
) -> None:
    budget = RESERVED * 37 + 50
    with tight_apis(
        stack, tmp_path, 2, LIMIT_TOKEN_BUDGET=str(budget), LIMIT_REQUESTS_PER_MINUTE="0", LIMIT_MAX_PENDING="0"
    ) as urls:
        responses = submit_in_parallel(urls, user["headers"], [BODY] * 200)

    assert _codes(responses) == {202: 37, "token_budget_exceeded": 163}
    # Nothing stored for a refusal, and not one token over the budget.
    rows, reserved = _rows(db, user["user_id"])
    assert (rows, reserved) == (37, 37 * RESERVED)
    assert reserved <= budget
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert f'"tokens";q={budget};w=86400' in refused.headers["RateLimit-Policy"]
    assert '"tokens";r=' in refused.headers["RateLimit"]
    accepted = next(r for r in responses if r.status_code == 202)
    assert accepted.headers["RateLimit"].startswith('"tokens";r=')


def test_requests_per_minute_hold_across_two_api_processes(
    stack: Stack, user: dict[str, Any], db: Engine, tmp_path: Path
) -> None:
    with tight_apis(stack, tmp_path, 2, LIMIT_REQUESTS_PER_MINUTE="10", LIMIT_MAX_PENDING="0") as urls:
        started = time.monotonic()
        responses = submit_in_parallel(urls, user["headers"], [BODY] * 60)
        elapsed = time.monotonic() - started
    codes = _codes(responses)
    # A burst of 10, then one more every 6 s.
    assert 10 <= codes[202] <= 10 + int(elapsed / 6)
    assert codes["rate_limited"] == 60 - codes[202]
    assert _rows(db, user["user_id"])[0] == codes[202]
    refused = next(r for r in responses if r.status_code == 429)
    assert 1 <= int(refused.headers["Retry-After"]) <= 6
    assert '"rpm";q=10;w=60' in refused.headers["RateLimit-Policy"]


def test_pending_cap_holds_in_parallel_and_drops_when_a_query_ends(
    stack: Stack, user: dict[str, Any], db: Engine, tmp_path: Path
) -> None:
    with tight_apis(stack, tmp_path, 2, LIMIT_MAX_PENDING="5", LIMIT_REQUESTS_PER_MINUTE="0") as urls:
        responses = submit_in_parallel(urls, user["headers"], [BODY] * 40)
        assert _codes(responses) == {202: 5, "too_many_pending": 35}
        with httpx.Client(base_url=urls[0], timeout=10) as api:
            query_id = next(r for r in responses if r.status_code == 202).json()["query_id"]
            assert api.post(f"/api/v1/query/{query_id}/cancel", headers=user["headers"]).status_code == 200
            assert api.post("/api/v1/query", json=BODY, headers=user["headers"]).status_code == 202
            again = api.post("/api/v1/query", json=BODY, headers=user["headers"])
    assert again.status_code == 429
    assert again.json()["error"]["code"] == "too_many_pending"
    assert _rows(db, user["user_id"])[0] == 6


def test_a_finished_query_settles_its_real_usage_once(stack: Stack, client: httpx.Client, user: dict[str, Any]) -> None:
    r = client.post(
        "/api/v1/query", json={"query": "settle me [[sim tokens=7]]", "max_tokens": 50}, headers=user["headers"]
    )
    assert r.status_code == 202, r.text
    query_id = r.json()["query_id"]
    done = wait_terminal(client, user["headers"], query_id)
    assert done["status"] == "completed"
    used = done["usage"]["total_tokens"]
    prefix, rds = key_prefix(stack.settings.queue_name), limits_redis(stack)
    # The reservation is gone (settling again does nothing) and the window holds exactly the real usage.
    assert not rds.exists(f"{prefix}res:{query_id}")
    windows = rds.keys(f"{prefix}tok:{user['user_id']}:*")
    assert [int(rds.get(k) or 0) for k in windows] == [used]
    assert rds.zcard(f"{prefix}pending:{user['user_id']}") == 0


def test_failed_and_cancelled_queries_release_their_reservation(
    stack: Stack, client: httpx.Client, user: dict[str, Any]
) -> None:
    failed = client.post("/api/v1/query", json={"query": "no [[sim fail=400]]"}, headers=user["headers"]).json()
    assert wait_terminal(client, user["headers"], failed["query_id"])["status"] == "failed"
    slow = client.post("/api/v1/query", json={"query": "slow [[sim latency_ms=5000]]"}, headers=user["headers"])
    slow_id = slow.json()["query_id"]
    time.sleep(0.5)
    client.post(f"/api/v1/query/{slow_id}/cancel", headers=user["headers"])
    assert wait_terminal(client, user["headers"], slow_id)["status"] == "cancelled"
    prefix, rds = key_prefix(stack.settings.queue_name), limits_redis(stack)
    assert [int(rds.get(k) or 0) for k in rds.keys(f"{prefix}tok:{user['user_id']}:*")] == [0]
    assert rds.zcard(f"{prefix}pending:{user['user_id']}") == 0


def test_an_admin_sets_a_users_limits(stack: Stack, client: httpx.Client, db: Engine, tmp_path: Path) -> None:
    admin, someone = register_and_login(client), register_and_login(client)
    url = f"/api/v1/admin/users/{someone['user_id']}/limits"
    assert client.put(url, json={"max_pending": 1}, headers=someone["headers"]).status_code == 403
    make_admin(db, admin["user_id"])
    r = client.put(url, json={"max_pending": 1, "token_budget": 0}, headers=admin["headers"])
    assert r.status_code == 200, r.text
    assert r.json()["max_pending"] == 1
    assert r.json()["overrides"] == {
        "requests_per_minute": None,
        "max_pending": 1,
        "token_budget": 0,
        "fair_weight": None,
        "max_share": None,
    }
    missing = client.put(f"/api/v1/admin/users/{uuid.uuid4()}/limits", json={}, headers=admin["headers"])
    assert missing.status_code == 404
    bad = client.put(url, json={"max_pending": -1}, headers=admin["headers"])
    assert bad.status_code == 422
    with tight_apis(stack, tmp_path, 1) as (api_url,), httpx.Client(base_url=api_url) as api:
        slow = {"query": "hold [[sim latency_ms=3000]]"}
        assert api.post("/api/v1/query", json=slow, headers=someone["headers"]).status_code == 202
        refused = api.post("/api/v1/query", json=slow, headers=someone["headers"])
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_pending"
        # The override of 0 switched the token budget off for this user.
        assert refused.headers["RateLimit-Policy"] == '"rpm";q=100000;w=60, "pending";q=1;qu="concurrent-requests"'


def test_an_admin_sets_a_users_fair_weight_and_share_cap(client: httpx.Client, db: Engine) -> None:
    admin, someone = register_and_login(client), register_and_login(client)
    make_admin(db, admin["user_id"])
    url = f"/api/v1/admin/users/{someone['user_id']}/limits"
    assert client.get(url, headers=admin["headers"]).json()["fair_weight"] == 1
    r = client.put(url, json={"fair_weight": 3, "max_share": 0.5}, headers=admin["headers"])
    assert r.status_code == 200, r.text
    assert (r.json()["fair_weight"], r.json()["max_share"]) == (3, 0.5)
    got = client.get(url, headers=admin["headers"]).json()
    assert got["overrides"]["fair_weight"] == 3
    assert got["max_share"] == 0.5
    # Out of bounds, or a number sent as a boolean or a string.
    bads: list[dict[str, Any]] = [
        {"fair_weight": 0},
        {"max_share": 0},
        {"max_share": 1.5},
        {"fair_weight": 10**6},
        {"token_budget": True},
        {"max_share": "0.5"},
        {"requests_per_minute": "60"},
    ]
    for bad in bads:
        assert client.put(url, json=bad, headers=admin["headers"]).status_code == 422, bad
    assert row_limits(db, someone["user_id"]) == (3, 0.5)


def row_limits(db: Engine, user_id: str) -> tuple[int | None, float | None]:
    with db.connect() as conn:
        found = conn.execute(
            text("SELECT fair_weight, max_share FROM user_limits WHERE user_id = :u"), {"u": user_id}
        ).one()
    return found[0], found[1]


def test_limit_overrides_are_bounded_and_the_largest_is_stored_whole(client: httpx.Client, db: Engine) -> None:
    # A budget may exceed what a 32-bit column holds (the column is a bigint); past the bounds it is a 422,
    # never a 500 from the INSERT.
    admin, someone = register_and_login(client), register_and_login(client)
    make_admin(db, admin["user_id"])
    url = f"/api/v1/admin/users/{someone['user_id']}/limits"
    biggest = client.put(url, json={"token_budget": 10**12}, headers=admin["headers"])
    assert biggest.status_code == 200, biggest.text
    for field, too_big in (
        ("token_budget", 10**12 + 1),
        ("requests_per_minute", 10**6 + 1),
        ("max_pending", 10**6 + 1),
    ):
        r = client.put(url, json={field: too_big}, headers=admin["headers"])
        assert r.status_code == 422, (field, r.text)
    assert client.get(url, headers=admin["headers"]).json()["token_budget"] == 10**12


def test_redis_down_refuses_submits_with_503_and_stores_nothing(
    stack: Stack, user: dict[str, Any], db: Engine, tmp_path: Path
) -> None:
    proc, url = spawn_api(stack, tmp_path / "api.log", REDIS_URL="redis://127.0.0.1:1/0")
    try:
        r = httpx.post(f"{url}/api/v1/query", json=BODY, headers=user["headers"], timeout=20)
    finally:
        stop(proc)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "limits_unavailable"
    assert r.headers["Retry-After"] == "2"
    assert _rows(db, user["user_id"])[0] == 0


def test_a_requeue_that_redis_refuses_leaves_the_query_failed(
    stack: Stack, user: dict[str, Any], db: Engine, tmp_path: Path
) -> None:
    query_id = insert_query(
        db, user["user_id"], status="'failed'", attempts="3", error_code="'upstream_retries_exhausted'"
    )
    make_admin(db, user["user_id"])
    proc, url = spawn_api(stack, tmp_path / "api.log", REDIS_URL="redis://127.0.0.1:1/0")
    try:
        r = httpx.post(f"{url}/api/v1/admin/queries/{query_id}/requeue", headers=user["headers"], timeout=20)
    finally:
        stop(proc)
    assert r.status_code == 503, r.text
    assert row(db, query_id)["status"] == "failed"


def test_the_sweeper_settles_a_query_it_ends_worker_lost(
    stack: Stack, client: httpx.Client, user: dict[str, Any], db: Engine
) -> None:
    # The lease lapses after the reservation below is taken: a sweep (every second) that ended the row before
    # then would have nothing to settle, and the reservation would stay.
    query_id = insert_query(
        db,
        user["user_id"],
        status="'running'",
        attempts=str(stack.settings.max_attempts),
        lease_owner="'worker-gone'",
        lease_expires_at="now() + interval '2 seconds'",
    )
    prefix, rds = key_prefix(stack.settings.queue_name), limits_redis(stack)
    limiter = Limiter(aioredis.Redis.from_url(stack.settings.redis_url), stack.settings)
    asyncio.run(limiter.take_submit(uuid.UUID(user["user_id"]), uuid.UUID(query_id), Limits(0, 0, 10**9, 86400), 500))
    assert rds.zcard(f"{prefix}pending:{user['user_id']}") == 1

    ended = wait_terminal(client, user["headers"], query_id)
    assert ended["error"]["code"] == "worker_lost"
    wait_until(lambda: not rds.exists(f"{prefix}res:{query_id}"), timeout=10)
    assert rds.zcard(f"{prefix}pending:{user['user_id']}") == 0
    assert [int(rds.get(k) or 0) for k in rds.keys(f"{prefix}tok:{user['user_id']}:*")] == [0]
