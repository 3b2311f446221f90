"""Several worker processes share one upstream budget against a strict simulator (real 429s, real headers).

Each test runs its own stack (tests/support/flow.py): a simulator that enforces a requests-per-minute
limit like OpenAI's, an API, and worker processes on their own queue and database.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.api import register_and_login
from tests.support.flow import LimitedStack, limited_stack, submit_many

pytestmark = pytest.mark.usefixtures("stack_turn")

# 240 requests a minute = 4 a second, with a burst of 8 (2 s): a backlog of 60 takes about 13 s.
SIM_LIMITS = ["--latency-ms", "100", "--limit-rpm", "240", "--limit-burst-seconds", "2"]
BACKLOG = 60


def _drain_floor(n: int, burst: int = 8, per_second: float = 4.0) -> float:
    """The fastest the provider's limit lets n calls through."""
    return max(0.0, (n - burst) / per_second)


def _user(stack: LimitedStack) -> dict[str, Any]:
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
        return register_and_login(client)


def _prompts(n: int, tag: str) -> list[str]:
    return [f"{tag} {i} {uuid.uuid4().hex[:8]}" for i in range(n)]


def test_configured_limits_are_shared_by_all_workers_waits_are_not_attempts_and_a_redis_wipe_is_survived(
    server_urls: dict[str, str], tmp_path: Path
) -> None:
    env = {"UPSTREAM_LIMITS": "sim-small=rpm:240", "UPSTREAM_PROBE_CONCURRENCY": "2"}
    with limited_stack(server_urls, tmp_path / "cfg", sim_args=SIM_LIMITS, env=env, workers=3) as stack:
        user = _user(stack)
        started = time.monotonic()
        ids = submit_many(stack.api_url, user["headers"], _prompts(BACKLOG, "configured"))
        # Mid-run, Redis loses the budget's state (a restart): the rows are the truth, the budget relearns.
        wiper = threading.Timer(4.0, stack.wipe_budget)
        wiper.start()
        try:
            rows = stack.wait_all_terminal(ids, timeout=120)
        finally:
            wiper.cancel()
        elapsed = time.monotonic() - started
        stats = stack.sim_stats()

    assert [r["status"] for r in rows] == ["completed"] * BACKLOG
    # Waiting for the budget never counted as an attempt: one call per query...
    throttled = stats["rate_limited_calls"]
    retried = [r for r in rows if r["attempts"] != 1]
    assert len(retried) <= throttled
    # ...and the provider refused almost nothing: the workers shaped the load to its limit between them.
    # (The wipe allows one probing round against a spent window: at most UPSTREAM_PROBE_CONCURRENCY per worker.)
    assert throttled <= 6, stats
    assert stats["total_calls"] == BACKLOG + throttled
    # The limit was really in force (the backlog could not have drained faster), and was used well.
    assert elapsed >= _drain_floor(BACKLOG) * 0.8


def test_learned_limits_converge_with_few_429s_and_nothing_failed(server_urls: dict[str, str], tmp_path: Path) -> None:
    env = {"UPSTREAM_PROBE_CONCURRENCY": "2"}
    with limited_stack(server_urls, tmp_path / "learned", sim_args=SIM_LIMITS, env=env, workers=3) as stack:
        user = _user(stack)
        ids = submit_many(stack.api_url, user["headers"], _prompts(BACKLOG, "learned"))
        rows = stack.wait_all_terminal(ids, timeout=120)
        stats = stack.sim_stats()
        learned = [k for k in stack.budget_keys() if k.endswith(b":learn")]

    assert [r["status"] for r in rows] == ["completed"] * BACKLOG
    assert learned, "the limits were learned into Redis"
    throttled = stats["rate_limited_calls"]
    assert throttled <= BACKLOG * 0.1, stats
    assert sum(r["attempts"] for r in rows) == BACKLOG + throttled


@pytest.mark.parametrize("ending", ["cancel", "failure"])
def test_the_slot_of_a_cancelled_or_failed_call_is_given_back(
    server_urls: dict[str, str], tmp_path: Path, ending: str
) -> None:
    env = {"UPSTREAM_LIMITS": "sim-small=concurrency:1", "UPSTREAM_PROBE_CONCURRENCY": "1"}
    sim = ["--latency-ms", "50"]
    with limited_stack(server_urls, tmp_path / ending, sim_args=sim, env=env, workers=1) as stack:
        user = _user(stack)
        headers = user["headers"]
        (warmup,) = submit_many(stack.api_url, headers, ["warm up"])
        stack.wait_all_terminal([warmup], timeout=30)
        prompt = "[[sim latency_ms=2500]] slow" if ending == "cancel" else "[[sim fail=400]] refused"
        (first,) = submit_many(stack.api_url, headers, [prompt])
        if ending == "cancel":
            deadline = time.monotonic() + 20
            while stack.rows([first])[0]["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            r = httpx.post(f"{stack.api_url}/api/v1/query/{first}/cancel", headers=headers, timeout=10)
            assert r.status_code in (200, 202), r.text
        (second,) = submit_many(stack.api_url, headers, ["after it"])
        rows = {r["id"]: r for r in stack.wait_all_terminal([first, second], timeout=40)}

    assert rows[first]["status"] == ("cancelled" if ending == "cancel" else "failed")
    # With one call allowed in flight, the next query ran only because the ended call's slot came back.
    assert rows[second]["status"] == "completed"
    assert rows[second]["attempts"] == 1
