"""End to end: API → PostgreSQL → Redis → a real Celery worker → the simulator over HTTP → poll."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
from sqlalchemy.engine import Engine

from shared.queue import Publisher, make_celery
from tests.support.api import register_and_login, wait_terminal
from tests.support.db import insert_query
from tests.support.stack import Stack, sim_calls


def _submit(client: httpx.Client, user: dict[str, Any], prompt: str, **extra: Any) -> str:
    r = client.post("/api/v1/query", json={"query": prompt, **extra}, headers=user["headers"])
    assert r.status_code == 202, r.text
    query_id: str = r.json()["query_id"]
    return query_id


def test_submitted_query_completes_with_answer_usage_and_timings(
    client: httpx.Client, stack: Stack, user: dict[str, Any]
) -> None:
    query_id = _submit(client, user, "Explain queues in one line", system="Be brief", temperature=0.2, max_tokens=64)
    body = wait_terminal(client, user["headers"], query_id)
    assert body["status"] == "completed", body
    assert body["response"]
    assert body["error"] is None
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["attempts"] == 1
    assert body["created_at"] <= body["started_at"] <= body["finished_at"]
    assert sim_calls(stack, query_id) == 1


def test_duplicate_delivery_never_calls_the_llm_twice(
    client: httpx.Client, stack: Stack, user: dict[str, Any], db: Engine
) -> None:
    query_id = _submit(client, user, "[[sim latency_ms=600]] duplicate me")
    publisher = Publisher(stack.settings)
    try:
        # Two more deliveries while the first is in flight, and one after the row is terminal.
        publisher.publish_sync(uuid.UUID(query_id))
        publisher.publish_sync(uuid.UUID(query_id))
        body = wait_terminal(client, user["headers"], query_id)
        publisher.publish_sync(uuid.UUID(query_id))
        wait_terminal(client, user["headers"], _submit(client, user, "a later query to flush the queue"))
    finally:
        publisher.close()
    assert body["status"] == "completed"
    assert body["attempts"] == 1
    assert sim_calls(stack, query_id) == 1
    after = client.get(f"/api/v1/query/{query_id}", headers=user["headers"]).json()
    assert after == body


def test_transient_failures_are_retried_to_success(client: httpx.Client, stack: Stack, user: dict[str, Any]) -> None:
    query_id = _submit(client, user, f"[[sim fail=500 times=2]] flaky {uuid.uuid4()}")
    body = wait_terminal(client, user["headers"], query_id)
    assert body["status"] == "completed", body
    assert body["attempts"] == 3
    assert body["error"] is None
    assert sim_calls(stack, query_id) == 3


def test_rate_limit_honours_retry_after(client: httpx.Client, stack: Stack, user: dict[str, Any], db: Engine) -> None:
    query_id = _submit(client, user, f"[[sim fail=429 times=1 retry_after=2]] busy {uuid.uuid4()}")
    body = wait_terminal(client, user["headers"], query_id)
    assert body["status"] == "completed", body
    assert body["attempts"] == 2
    # The second attempt may not start before the upstream's Retry-After: the row records when it finished.
    from datetime import datetime

    elapsed = datetime.fromisoformat(body["finished_at"]) - datetime.fromisoformat(body["started_at"])
    assert elapsed.total_seconds() >= 2


def test_timeouts_and_dropped_connections_are_transient(
    client: httpx.Client, stack: Stack, user: dict[str, Any]
) -> None:
    hang = _submit(client, user, f"[[sim fail=hang times=1]] slow {uuid.uuid4()}")
    drop = _submit(client, user, f"[[sim fail=drop times=1]] cut {uuid.uuid4()}")
    for query_id in (hang, drop):
        body = wait_terminal(client, user["headers"], query_id, timeout=40)
        assert body["status"] == "completed", body
        assert body["attempts"] == 2


def test_permanent_failures_fail_at_once_with_a_clear_code(
    client: httpx.Client, stack: Stack, user: dict[str, Any]
) -> None:
    expected = {
        "400": "upstream_bad_request",
        "404": "model_not_found",
        "401": "upstream_auth_failed",
        "quota": "upstream_quota_exceeded",
    }
    ids = {fault: _submit(client, user, f"[[sim fail={fault}]] {uuid.uuid4()}") for fault in expected}
    for fault, query_id in ids.items():
        body = wait_terminal(client, user["headers"], query_id)
        assert body["status"] == "failed", body
        assert body["error"]["code"] == expected[fault]
        assert body["attempts"] == 1
        assert sim_calls(stack, query_id) == 1
        assert "sk-" not in body["error"]["message"]


def test_exhausted_retries_fail_after_max_attempts(client: httpx.Client, stack: Stack, user: dict[str, Any]) -> None:
    query_id = _submit(client, user, f"[[sim fail=500]] always broken {uuid.uuid4()}")
    body = wait_terminal(client, user["headers"], query_id)
    assert body["status"] == "failed"
    assert body["error"]["code"] == "upstream_retries_exhausted"
    assert body["attempts"] == stack.settings.max_attempts
    assert sim_calls(stack, query_id) == stack.settings.max_attempts


def test_secrets_and_prompts_never_reach_the_logs(client: httpx.Client, stack: Stack) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    info = register_and_login(client, password=password)
    client.post("/api/v1/auth/login", json={"email": info["email"], "password": "wrong-" + password})
    prompt = f"PROMPT-MARKER-{uuid.uuid4().hex}"
    ok = _submit(client, info, prompt)
    bad = _submit(client, info, f"[[sim fail=401]] {prompt}")
    invalid = client.post("/api/v1/query", json={"query": prompt, "temperature": 9}, headers=info["headers"])
    assert invalid.status_code == 422
    for query_id in (ok, bad):
        wait_terminal(client, info["headers"], query_id)
    logs = stack.read_logs()
    assert ok in logs  # the logs do follow the query, by id
    for secret in (
        prompt,
        password,
        info["tokens"]["access_token"],
        info["tokens"]["refresh_token"],
        stack.settings.jwt_secret_key.get_secret_value(),
        stack.settings.openai_api_key.get_secret_value(),
    ):
        assert secret not in logs


def test_the_worker_runs_its_tasks_on_the_loop_pool(stack: Stack) -> None:
    """The worker's pool is AIQ's loop pool (worker/pool.py), as Celery's remote control reports it."""
    app = make_celery(stack.settings)
    try:
        stats = app.control.inspect(timeout=5).stats() or {}
    finally:
        app.close()
    assert stats, "no worker answered"
    for worker in stats.values():
        assert worker["pool"]["implementation"] == "worker.pool:LoopPool"
        assert worker["pool"]["max-concurrency"] == stack.settings.worker_concurrency


def test_each_worker_log_line_carries_its_own_tasks_query_id(
    client: httpx.Client, stack: Stack, user: dict[str, Any]
) -> None:
    """Each message's task runs on the shared loop in a greenlet (worker/pool.py); the query id the task sets
    reaches the lines its coroutines log, and never another task's lines (they overlap in time here)."""
    ids = [_submit(client, user, f"[[sim latency_ms=300]] overlap {i}") for i in range(6)]
    for query_id in ids:
        assert wait_terminal(client, user["headers"], query_id)["status"] == "completed"
    lines = [json.loads(line) for line in stack.logs["worker"].read_text().splitlines() if line.startswith("{")]
    completed = [line for line in lines if line["msg"] == "query completed"]
    # Six distinct ids on six overlapping tasks' lines: no task's context leaked into another's.
    assert {line.get("query_id") for line in completed} >= set(ids)


def _long_poll(
    client: httpx.Client, headers: dict[str, str], query_id: str, wait: float
) -> tuple[httpx.Response, float]:
    """GET with `wait`; the response and how long it took."""
    started = time.monotonic()
    r = client.get(f"/api/v1/query/{query_id}", params={"wait": wait}, headers=headers, timeout=30)
    return r, time.monotonic() - started


def test_long_poll_answers_when_the_query_ends_not_before(client: httpx.Client, user: dict[str, Any]) -> None:
    query_id = _submit(client, user, f"[[sim latency_ms=1200]] long-poll {uuid.uuid4()}")
    r, elapsed = _long_poll(client, user["headers"], query_id, 20)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "completed"
    # Not before the upstream answered (1.2 s), and within a check interval (≤ 1 s) of the row turning terminal.
    assert 1.0 <= elapsed < 5.0, elapsed
    # A terminal query answers at once, whatever the wait.
    again, elapsed = _long_poll(client, user["headers"], query_id, 20)
    assert again.json()["status"] == "completed"
    assert elapsed < 1.0


def test_long_poll_times_out_with_the_current_state(client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    # Pending and not due for an hour: nothing will happen to it during the wait.
    query_id = insert_query(db, user["user_id"], next_attempt_at="now() + interval '1 hour'")
    r, elapsed = _long_poll(client, user["headers"], query_id, 1.5)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "pending"
    assert 1.4 <= elapsed < 4.0, elapsed


def test_long_poll_rejects_bad_waits_and_other_users_queries(
    client: httpx.Client, user: dict[str, Any], db: Engine
) -> None:
    query_id = insert_query(db, user["user_id"], next_attempt_at="now() + interval '1 hour'")
    for wait in ("-1", "31", "soon"):
        r = client.get(f"/api/v1/query/{query_id}", params={"wait": wait}, headers=user["headers"])
        assert r.status_code == 422, (wait, r.text)
        assert r.json()["error"]["code"] == "validation_error"
    other = register_and_login(client)
    r, elapsed = _long_poll(client, other["headers"], query_id, 20)
    assert r.status_code == 404
    assert elapsed < 1.0
