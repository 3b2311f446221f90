"""The opt-in response cache, end to end: API, a real worker, the simulator and Redis."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine

from shared.cache import request_digest
from tests.support.api import register_and_login, wait_terminal
from tests.support.limits import key_prefix, limits_redis
from tests.support.polling import wait_until
from tests.support.stack import Stack, sim_calls, spawn_api, stop


def _body(**extra: Any) -> dict[str, Any]:
    # A unique prompt per test: the stack's Redis and simulator are shared by the whole run.
    return {"query": f"what is a cache? {uuid.uuid4().hex}", "max_tokens": 40, **extra}


def _cache_prefix(stack: Stack) -> str:
    return f"aiq:{stack.settings.queue_name}:cache:"


def _submit(client: httpx.Client, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/api/v1/query", json=body, headers=headers)
    assert response.status_code == 202, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


def _answered(stack: Stack, client: httpx.Client, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    """Submit, wait for the worker's answer and for it to be stored in the cache (when the query asked)."""
    query_id = _submit(client, headers, body)["query_id"]
    done = wait_terminal(client, headers, query_id)
    r = limits_redis(stack)
    wait_until(lambda: not r.exists(f"{_cache_prefix(stack)}intent:{query_id}"), timeout=10)
    return done


def test_cache_is_off_by_default(stack: Stack, client: httpx.Client, user: dict[str, Any]) -> None:
    body = _body()
    first = _answered(stack, client, user["headers"], body)
    second = _answered(stack, client, user["headers"], body)
    assert first["status"] == second["status"] == "completed"
    assert (first["cached"], second["cached"]) == (False, False)
    assert sim_calls(stack, second["query_id"]) == 1
    r = limits_redis(stack)
    assert list(r.scan_iter(f"{_cache_prefix(stack)}user:{user['user_id']}:*")) == []


def test_identical_request_is_answered_at_submit_without_provider_call(
    stack: Stack, client: httpx.Client, user: dict[str, Any], db: Engine
) -> None:
    headers = user["headers"]
    body = _body(cache=True, system="Be brief.", temperature=0.2)
    first = _answered(stack, client, headers, body)
    assert first["status"] == "completed"
    assert first["cached"] is False

    response = client.post("/api/v1/query", json=body, headers=headers)
    assert response.status_code == 202
    accepted = response.json()
    assert (accepted["status"], accepted["cached"]) == ("completed", True)
    assert response.headers["Location"] == f"/api/v1/query/{accepted['query_id']}"
    hit = client.get(f"/api/v1/query/{accepted['query_id']}", headers=headers).json()
    assert hit["status"] == "completed"
    assert hit["cached"] is True
    assert hit["response"] == first["response"]
    assert hit["usage"] == first["usage"]
    assert hit["attempts"] == 0
    assert hit["started_at"] is not None
    assert hit["finished_at"] is not None
    # No provider call, and no worker ever saw it (attempts 0, nothing in the simulator for its id).
    assert sim_calls(stack, accepted["query_id"]) == 0
    with db.connect() as conn:
        stored = conn.execute(
            text("SELECT cached, reserved_tokens FROM queries WHERE id = :id"), {"id": accepted["query_id"]}
        ).one()
    assert tuple(stored) == (True, 0)

    # The key is namespaced by queue and user and names the request only by its SHA-256.
    digest = request_digest("sim-small", "Be brief.", body["query"], 0.2, 40)
    key = f"{_cache_prefix(stack)}user:{user['user_id']}:{digest}"
    r = limits_redis(stack)
    assert 0 < r.ttl(key) <= stack.settings.response_cache_ttl_seconds
    assert not [k for k in r.scan_iter(f"{_cache_prefix(stack)}*") if body["query"] in k]

    # Usage counts the hit's tokens, and says which of them came from the cache.
    usage = client.get("/api/v1/usage", params={"group_by": "model"}, headers=headers).json()
    total = first["usage"]["total_tokens"]
    assert usage["totals"]["queries"] == 2
    assert usage["totals"]["total_tokens"] == 2 * total
    assert usage["totals"]["cached_tokens"] == total
    assert usage["items"][0]["cached_tokens"] == total


def test_only_identical_requests_hit_and_cache_false_bypasses(
    stack: Stack, client: httpx.Client, user: dict[str, Any]
) -> None:
    headers = user["headers"]
    body = _body(cache=True)
    _answered(stack, client, headers, body)
    variants = [
        {**body, "temperature": 0.5},
        {**body, "max_tokens": 41},
        {**body, "system": "Be brief."},
        {**body, "model": "sim-large"},
        {**body, "query": body["query"] + " "},
        {**body, "cache": False},
    ]
    for variant in variants:
        accepted = _submit(client, headers, variant)
        assert (accepted["status"], accepted["cached"]) == ("pending", False), variant
        done = wait_terminal(client, headers, accepted["query_id"])
        assert done["cached"] is False
        assert sim_calls(stack, accepted["query_id"]) == 1
    # Metadata is not part of the request to the model: it does not make a difference.
    assert _submit(client, headers, {**body, "metadata": {"ticket": "T-1"}})["cached"] is True


def test_cache_is_per_user_unless_global(stack: Stack, client: httpx.Client, tmp_path: Path) -> None:
    alice, bob = register_and_login(client), register_and_login(client)
    body = _body(cache=True)
    _answered(stack, client, alice["headers"], body)
    assert _submit(client, alice["headers"], body)["cached"] is True
    # Another user's identical request is a miss in the default scope.
    bob_query = _submit(client, bob["headers"], body)
    assert bob_query["cached"] is False
    assert wait_terminal(client, bob["headers"], bob_query["query_id"])["status"] == "completed"
    assert sim_calls(stack, bob_query["query_id"]) == 1

    # Global scope, with the cache on by default and a short TTL: an API process configured so.
    proc, url = spawn_api(
        stack,
        tmp_path / "api-global.log",
        RESPONSE_CACHE_SCOPE="global",
        RESPONSE_CACHE_DEFAULT="true",
        RESPONSE_CACHE_TTL_SECONDS="3",
    )
    try:
        with httpx.Client(base_url=url, timeout=10) as api:
            shared_body = _body()
            _answered(stack, api, alice["headers"], shared_body)
            hit = _submit(api, bob["headers"], shared_body)
            assert (hit["status"], hit["cached"]) == ("completed", True)
            bob_view = api.get(f"/api/v1/query/{hit['query_id']}", headers=bob["headers"]).json()
            assert bob_view["response"]
            digest = request_digest("sim-small", None, shared_body["query"], None, 40)
            key = f"{_cache_prefix(stack)}global:{digest}"
            r = limits_redis(stack)
            assert 0 < r.ttl(key) <= 3
            # After the TTL the entry is gone and the same request goes to the provider again.
            wait_until(lambda: not r.exists(key), timeout=15, interval=0.2)
            again = _submit(api, bob["headers"], shared_body)
            assert again["cached"] is False
            assert wait_terminal(api, bob["headers"], again["query_id"])["status"] == "completed"
            assert sim_calls(stack, again["query_id"]) == 1
            # An explicit `cache: false` still bypasses a default of true.
            assert _submit(api, bob["headers"], {**shared_body, "cache": False})["cached"] is False
    finally:
        stop(proc)


def test_failed_answers_are_not_cached(stack: Stack, client: httpx.Client, user: dict[str, Any]) -> None:
    body = _body(cache=True, query=f"[[sim fail=400]] {uuid.uuid4().hex}")
    first = wait_terminal(client, user["headers"], _submit(client, user["headers"], body)["query_id"])
    assert first["status"] == "failed"
    again = _submit(client, user["headers"], body)
    assert again["cached"] is False
    assert wait_terminal(client, user["headers"], again["query_id"])["status"] == "failed"


def test_hit_obeys_auth_and_request_rate_but_takes_no_token_budget(
    stack: Stack, client: httpx.Client, user: dict[str, Any], db: Engine, tmp_path: Path
) -> None:
    headers, uid = user["headers"], user["user_id"]
    body = _body()
    # ceil(len / 4) prompt tokens + max_tokens: one reservation fits the budget, two do not.
    reserved = -(-len(body["query"]) // 4) + body["max_tokens"]
    proc, url = spawn_api(
        stack,
        tmp_path / "api-limits.log",
        RESPONSE_CACHE_DEFAULT="true",
        LIMIT_REQUESTS_PER_MINUTE="3",
        LIMIT_TOKEN_BUDGET=str(reserved + 5),
        LIMIT_MAX_PENDING="1",
    )
    try:
        with httpx.Client(base_url=url, timeout=10) as api:
            first = _answered(stack, api, headers, body)
            assert first["status"] == "completed"
            r: redis.Redis = limits_redis(stack)
            prefix = key_prefix(stack.settings.queue_name)
            (token_key,) = r.scan_iter(f"{prefix}tok:{uid}:*")
            held = int(r.get(token_key) or 0)
            assert held == first["usage"]["total_tokens"]

            assert api.post("/api/v1/query", json=body).status_code == 401
            assert api.post("/api/v1/query", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401

            hit = api.post("/api/v1/query", json=body, headers=headers)
            assert hit.status_code == 202
            assert hit.json()["cached"] is True
            assert hit.headers["RateLimit"].startswith('"rpm";r=')
            # A miss needs a reservation the budget no longer has; a hit needs none.
            other = api.post("/api/v1/query", json=_body(), headers=headers)
            assert other.status_code == 429
            assert other.json()["error"]["code"] == "token_budget_exceeded"
            assert api.post("/api/v1/query", json=body, headers=headers).json()["cached"] is True
            # The per-minute limit binds hits too (3: the miss and two hits).
            refused = api.post("/api/v1/query", json=body, headers=headers)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "rate_limited"
            assert int(refused.headers["Retry-After"]) >= 1
            # Hits took no tokens and hold no pending slot.
            assert int(r.get(token_key) or 0) == held
            assert r.zcard(f"{prefix}pending:{uid}") == 0
    finally:
        stop(proc)
    with db.connect() as conn:
        rows = conn.execute(
            text("SELECT count(*), count(*) FILTER (WHERE cached) FROM queries WHERE user_id = :u"), {"u": uid}
        ).one()
    assert tuple(rows) == (3, 2)


def test_hit_under_an_idempotency_key_replays(stack: Stack, client: httpx.Client, user: dict[str, Any]) -> None:
    headers = user["headers"]
    body = _body(cache=True)
    _answered(stack, client, headers, body)
    keyed = {**headers, "Idempotency-Key": uuid.uuid4().hex}
    first = client.post("/api/v1/query", json=body, headers=keyed)
    assert first.status_code == 202
    assert first.json()["cached"] is True
    replay = client.post("/api/v1/query", json=body, headers=keyed)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == first.json()


def test_cache_field_must_be_a_boolean(client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    body = _body(cache="sometimes")
    response = client.post("/api/v1/query", json=body, headers=user["headers"])
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"
    with db.connect() as conn:
        count = conn.execute(text("SELECT count(*) FROM queries WHERE user_id = :u"), {"u": user["user_id"]})
        assert count.scalar_one() == 0
