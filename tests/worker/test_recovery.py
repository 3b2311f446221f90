"""The row is the truth: lost messages, dead workers and a dead broker never lose a query."""

from __future__ import annotations

import os
import signal
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine

from devkit.procs import free_port
from shared.upstream import UpstreamBudget
from tests.support.api import wait_terminal
from tests.support.db import insert_query, row
from tests.support.polling import wait_until
from tests.support.stack import Stack, publish_to, sim_calls, spawn_api, spawn_worker, stop

# A claim whose worker is gone: running, lease already expired.
_ORPHANED = {"status": "'running'", "lease_owner": "'dead-host:1'", "lease_expires_at": "now() - interval '1 second'"}


def _scalar(db: Engine, sql: str) -> Any:
    with db.connect() as conn:
        return conn.execute(text(sql)).scalar()


def test_pending_row_whose_message_was_lost_is_resent(client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    query_id = insert_query(db, user["user_id"], updated_at="now() - interval '1 minute'")
    body = wait_terminal(client, user["headers"], query_id, timeout=20)
    assert body["status"] == "completed"
    assert body["attempts"] == 1


def test_expired_lease_is_reclaimed_and_the_stale_attempt_cannot_write(
    client: httpx.Client, user: dict[str, Any], db: Engine
) -> None:
    query_id = insert_query(db, user["user_id"], **_ORPHANED, attempts="1")
    body = wait_terminal(client, user["headers"], query_id, timeout=20)
    assert body["status"] == "completed"
    assert body["attempts"] == 2
    # The dead worker's attempt 1, coming back late, is fenced off by the attempt number.
    with db.begin() as conn:
        late = conn.execute(
            text("UPDATE queries SET response = 'late' WHERE id = :id AND status = 'running' AND attempts = 1"),
            {"id": query_id},
        )
    assert late.rowcount == 0
    assert row(db, query_id)["response"] != "late"


def test_exhausted_attempts_on_expired_lease_fail_as_worker_lost(
    client: httpx.Client, stack: Stack, user: dict[str, Any], db: Engine
) -> None:
    query_id = insert_query(db, user["user_id"], **_ORPHANED, attempts=str(stack.settings.max_attempts))
    body = wait_terminal(client, user["headers"], query_id, timeout=20)
    assert body["status"] == "failed"
    assert body["error"]["code"] == "worker_lost"


def test_sigkilled_worker_query_completes_elsewhere(
    client: httpx.Client, stack: Stack, user: dict[str, Any], db: Engine, tmp_path: Path
) -> None:
    # The extra worker takes the query on its own private queue, so we know exactly who holds it.
    queue = f"aiq.victim.{uuid.uuid4().hex[:6]}"
    victim, _ = spawn_worker(stack, tmp_path / "victim.log", QUEUE_NAME=queue)
    try:
        query_id = insert_query(db, user["user_id"], f"[[sim latency_ms=2000]] doomed {uuid.uuid4()}")
        publish_to(stack, queue, query_id)
        # Kill mid-call: the claim is committed and the upstream has the request.
        wait_until(lambda: sim_calls(stack, query_id) == 1, timeout=20)
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
    finally:
        if victim.poll() is None:
            victim.kill()
    body = wait_terminal(client, user["headers"], query_id, timeout=30)
    recovered_in = time.monotonic() - killed_at
    assert body["status"] == "completed"
    assert body["attempts"] == 2
    # Lease (3 s here) + sweep interval (1 s) + the 2 s call, with slack for a loaded machine.
    assert recovered_in < 15, recovered_in
    assert sim_calls(stack, query_id) == 2  # the killed attempt's call is the only extra one


def test_sigterm_finishes_short_calls_and_hands_back_long_ones(
    client: httpx.Client, stack: Stack, user: dict[str, Any], db: Engine, tmp_path: Path
) -> None:
    queue = f"aiq.graceful.{uuid.uuid4().hex[:6]}"
    log_path = tmp_path / "graceful.log"
    worker, _ = spawn_worker(stack, log_path, QUEUE_NAME=queue, SHUTDOWN_GRACE_SECONDS="1", LLM_TIMEOUT_SECONDS="10")
    ids = {
        name: insert_query(db, user["user_id"], f"[[sim latency_ms={latency}]] {name} {uuid.uuid4()}")
        for name, latency in (("short", 300), ("long", 2500))
    }
    publish_to(stack, queue, *ids.values())
    try:
        wait_until(lambda: all(row(db, q)["status"] == "running" for q in ids.values()), timeout=20)
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0
    short = row(db, ids["short"])
    assert short["status"] == "completed"
    assert short["attempts"] == 1
    # The long one was handed back as pending and finishes on the main worker.
    body = wait_terminal(client, user["headers"], ids["long"], timeout=30)
    assert body["status"] == "completed"
    assert body["attempts"] == 2


def test_submit_with_a_dead_broker_is_fast_and_the_sweeper_sends_it_later(
    stack: Stack, user: dict[str, Any], db: Engine, tmp_path: Path
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    # With limits on, a dead Redis refuses submits (503 limits_unavailable, tests/api/test_limits.py):
    # switched off here, the broker outage alone is what is tested.
    off = {"LIMIT_REQUESTS_PER_MINUTE": "0", "LIMIT_MAX_PENDING": "0", "LIMIT_TOKEN_BUDGET": "0"}
    api, url = spawn_api(stack, tmp_path / "api-dead-broker.log", REDIS_URL=dead, **off)
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            ready = c.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"] == {"database": "ok", "broker": "down"}
            started = time.monotonic()
            r = c.post("/api/v1/query", json={"query": "broker is down"}, headers=user["headers"])
            took = time.monotonic() - started
    finally:
        stop(api, 10)
    assert r.status_code == 202
    assert took < 2.0, took
    query_id = r.json()["query_id"]
    # The row was committed; the main stack's workers find it once it has been pending long enough.
    with httpx.Client(base_url=stack.api_url, timeout=10) as c:
        body = wait_terminal(c, user["headers"], query_id, timeout=30)
    assert body["status"] == "completed"


def test_a_failed_final_write_is_retried_without_calling_the_llm_again(
    client: httpx.Client, stack: Stack, user: dict[str, Any], db: Engine
) -> None:
    """The connection dies under the worker's final write: the write is retried, the LLM is not called again.

    The test holds the row's lock as the answer arrives, so the completion UPDATE waits on it, then terminates
    that backend (what a PostgreSQL restart does to every session) and lets go of the lock.
    """
    r = client.post(
        "/api/v1/query", json={"query": f"[[sim latency_ms=1500]] write-retry {uuid.uuid4()}"}, headers=user["headers"]
    )
    query_id = r.json()["query_id"]
    wait_until(lambda: row(db, query_id)["status"] == "running", timeout=20)
    waiting_write = (
        "FROM pg_stat_activity WHERE application_name = 'aiq-worker' AND datname = current_database()"
        " AND wait_event_type = 'Lock' AND query ILIKE 'UPDATE queries%' AND query ILIKE '%finished_at%'"
    )
    with db.connect() as locker:
        locker.execute(text("BEGIN"))
        locker.execute(text("SELECT 1 FROM queries WHERE id = :id FOR UPDATE"), {"id": query_id})
        # A new transaction per look: pg_stat_activity is a snapshot within one.
        wait_until(lambda: _scalar(db, f"SELECT pid {waiting_write}") is not None, timeout=10)
        assert _scalar(db, f"SELECT pg_terminate_backend(pid) {waiting_write}")
        locker.execute(text("COMMIT"))
    body = wait_terminal(client, user["headers"], query_id, timeout=30)
    assert body["status"] == "completed", body
    assert body["attempts"] == 1
    assert sim_calls(stack, query_id) == 1
    retried = [
        line
        for line in stack.read_logs().splitlines()
        if '"database step failed; retrying"' in line and query_id in line
    ]
    assert retried, "the worker's write never failed: the test did not exercise the retry"


def test_rows_a_dispatcher_holds_are_not_resent_until_its_marker_lapses(
    client: httpx.Client, stack: Stack, user: dict[str, Any], db: Engine
) -> None:
    # The model's waiters marker stands (a dispatcher claims its due rows in fair order): the sweeper leaves its
    # stale rows alone, restarting their stale clock, and sends them once the marker is gone.
    r = redis.Redis.from_url(stack.settings.redis_url)
    try:
        marker = UpstreamBudget(r, stack.settings).keys("sim-small")[5]  # type: ignore[arg-type]
        r.set(marker, 1, px=5000)
        query_id = insert_query(db, user["user_id"], updated_at="now() - interval '1 minute'")
        held_from = time.monotonic()
        # Several sweeps (every second here) pass while the marker stands.
        time.sleep(3)
        stored = row(db, query_id)
        assert (stored["status"], stored["attempts"]) == ("pending", 0)
        # Touched by the sweeps (the row was a minute stale): not picked again until a stale window passes.
        assert stored["updated_at"] > datetime.now(UTC) - timedelta(seconds=3)
        body = wait_terminal(client, user["headers"], query_id, timeout=30)
    finally:
        r.close()
    assert body["status"] == "completed"
    assert body["attempts"] == 1
    # Sent only after the marker lapsed (5 s) and the touched row went stale again (STALE_PENDING_SECONDS 3).
    assert time.monotonic() - held_from >= 5
