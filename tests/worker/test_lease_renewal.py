"""A slow call on a living worker keeps its lease: the heartbeat renews it, so no sweeper steals the query
and the LLM is called once, however many leases the call outlives."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.support.db import insert_query, row
from tests.support.polling import wait_until
from tests.support.stack import Stack, publish_to, sim_calls, spawn_worker, stop

LEASE_SECONDS = 2.0
HEARTBEAT_SECONDS = 0.5  # the validator wants at most half the lease
SWEEP_INTERVAL_SECONDS = 0.5
CALL_SECONDS = 6.0  # three leases: without renewal the lease is long expired before the answer comes
LLM_TIMEOUT_SECONDS = 20.0

_SAMPLE = text(
    "SELECT status, attempts, lease_owner, lease_expires_at, started_at, now() AS db_now FROM queries WHERE id = :id"
)


def _sample(db: Engine, query_id: str) -> dict[str, Any]:
    with db.connect() as conn:
        return dict(conn.execute(_SAMPLE, {"id": query_id}).mappings().one())


def test_slow_call_on_a_living_worker_keeps_its_lease_and_is_called_once(
    stack: Stack, user: dict[str, Any], db: Engine, tmp_path: Path
) -> None:
    # Its own queue, so this worker (short lease, fast heartbeat, eager sweeper) is the one holding the call.
    # The stack's worker sweeps the same table every second too: two sweepers that would steal a stale lease.
    queue = f"aiq.lease.{uuid.uuid4().hex[:6]}"
    log_path = tmp_path / "lease-worker.log"
    worker, _ = spawn_worker(
        stack,
        log_path,
        QUEUE_NAME=queue,
        LEASE_SECONDS=str(LEASE_SECONDS),
        HEARTBEAT_SECONDS=str(HEARTBEAT_SECONDS),
        SWEEP_INTERVAL_SECONDS=str(SWEEP_INTERVAL_SECONDS),
        LLM_TIMEOUT_SECONDS=str(LLM_TIMEOUT_SECONDS),
    )
    samples: list[dict[str, Any]] = []
    try:
        latency_ms = int(CALL_SECONDS * 1000)
        query_id = insert_query(db, user["user_id"], f"[[sim latency_ms={latency_ms}]] slow but alive {uuid.uuid4()}")
        publish_to(stack, queue, query_id)
        wait_until(lambda: _sample(db, query_id)["status"] != "pending", timeout=20, interval=0.02)
        deadline = time.monotonic() + CALL_SECONDS + 15
        while time.monotonic() < deadline:
            sample = _sample(db, query_id)
            samples.append(sample)
            if sample["status"] != "running":
                break
            time.sleep(0.2)
    finally:
        stop(worker, 20)

    final = row(db, query_id)
    running = [s for s in samples if s["status"] == "running"]
    history = [(s["status"], s["attempts"], s["lease_owner"], s["lease_expires_at"], s["db_now"]) for s in samples]
    assert final["status"] == "completed", (final["status"], final["error_code"], history)
    assert final["attempts"] == 1, history
    assert sim_calls(stack, query_id) == 1, history
    # Running the whole time, then completed: never handed back to pending, never claimed again.
    assert [s["status"] for s in samples] == ["running"] * len(running) + ["completed"], history
    assert {(s["attempts"], s["lease_owner"]) for s in running} == {(1, running[0]["lease_owner"])}, history

    # The lease the claim took (claim time + lease) ran out while the call was still in flight ...
    original_expiry = running[0]["started_at"] + timedelta(seconds=LEASE_SECONDS)
    assert running[0]["lease_expires_at"] >= original_expiry, history
    outlived = [s for s in running if s["db_now"] > original_expiry + timedelta(seconds=HEARTBEAT_SECONDS)]
    assert len(outlived) >= 3, history
    # ... yet every look at the row found a lease still valid, pushed forward past the original expiry.
    for s in outlived:
        assert s["lease_expires_at"] > s["db_now"], history
        assert s["lease_expires_at"] > original_expiry, history
    expiries = [s["lease_expires_at"] for s in running]
    assert expiries == sorted(expiries), history
    assert expiries[-1] - original_expiry >= timedelta(seconds=2 * LEASE_SECONDS), history
    assert "lease lost" not in log_path.read_text(errors="replace")
