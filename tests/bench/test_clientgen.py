"""bench/clientgen.py, the client-side scenario's load generator, against the real stack and simulator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devkit.paths import ROOT
from tests.support.stack import Stack

SIM_KEY = "sk-test-sim-key-0123456789"


def _run(tmp_path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps({"rate": 5, "duration_s": 1, "upstream_ms": 50, "timeout_s": 30, **spec}))
    subprocess.run([sys.executable, "-m", "bench.clientgen", str(spec_path), str(out_path)], cwd=ROOT, check=True)
    result: dict[str, Any] = json.loads(out_path.read_text())
    return result


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("mode", ["longpoll", "wait", "sse"])
def test_each_client_submits_and_waits_for_its_answer(
    stack: Stack, user: dict[str, Any], tmp_path: Path, mode: str
) -> None:
    body = json.dumps({"query": f"clientgen {mode}"})
    token = user["tokens"]["access_token"]
    r = _run(tmp_path, {"port": _port(stack.api_url), "mode": mode, "token": token, "body": body})
    assert r["arrivals"] == 5
    assert r["answered"] == 5, r
    assert r["errors"] == 0
    assert r["statuses"] == {"completed": 5}
    # A submit and at least one wait per client (`wait`: the submit waits, one request each); the overhead is
    # the answer time minus the upstream's 50 ms, which no answer can beat.
    assert r["requests"] == 5 if mode == "wait" else r["requests"] >= 10
    assert r["overhead_ms"]["p50"] is not None
    assert 0 <= r["overhead_ms"]["p50"] <= r["overhead_ms"]["max"]
    assert r["cpu_s"] > 0
    if mode in ("longpoll", "wait"):
        # Where the overhead arose, from each answer's own timestamps: four phases that add up to it.
        phases = r["phases_ms"]
        assert set(phases) == {"submit", "queue", "run", "deliver"}
        assert all(phases[k]["p50"] is not None for k in phases)
        assert phases["queue"]["p50"] >= 0
        assert phases["deliver"]["p50"] >= 0
    else:
        assert r["phases_ms"] == {}


def test_refused_clients_are_counted_as_errors_not_answers(stack: Stack, tmp_path: Path) -> None:
    body = json.dumps({"query": "clientgen refused"})
    r = _run(tmp_path, {"port": _port(stack.api_url), "mode": "longpoll", "token": "not-a-token", "body": body})
    assert r["answered"] == 0
    assert r["errors_by_kind"] == {"submit:401": 5}
    assert r["overhead_ms"]["p50"] is None


def test_chat_mode_is_one_synchronous_completion_per_client(stack: Stack, tmp_path: Path) -> None:
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "clientgen chat"}]})
    r = _run(tmp_path, {"port": _port(stack.simulator_url), "mode": "chat", "token": SIM_KEY, "body": body})
    assert r["answered"] == 5, r
    assert r["requests"] == 5
    assert r["errors"] == 0


def test_a_system_that_keeps_up_reads_the_arrival_rate_whatever_its_steady_overhead() -> None:
    from bench.clientgen import Run

    def pace(done_at: list[float]) -> float:
        run = Run({"port": 1, "mode": "longpoll", "body": "{}", "rate": 200, "duration_s": 4, "upstream_ms": 500})
        run.t0, run.arrivals = 100.0, 800
        run.done_at = done_at
        run.answer_s = [(i / 200, 0.5) for i in range(len(done_at))]
        return float(run.result(0.0)["answers_per_s"])

    # 800 arrivals at 200/s, each answered 500 ms + 10 ms after it arrived.
    assert pace([100.0 + i / 200 + 0.51 for i in range(800)]) == 200.0
    # Falling behind: each answer 1 ms later than the one before it on top of the arrivals' pace.
    assert pace([100.0 + i / 200 + 0.51 + i * 0.001 for i in range(800)]) == 166.7
    assert pace([100.51]) == 0.0


def test_the_slowest_seconds_name_when_a_stall_hit_and_how_many_answers_it_pushed_past_the_bound() -> None:
    from bench.clientgen import Run

    run = Run({"port": 1, "mode": "longpoll", "body": "{}", "rate": 10, "duration_s": 4, "upstream_ms": 500})
    run.t0 = 1000.0
    # 10 arrivals a second for 4 s, each 510 ms to its answer, but two in second 2 took 0.5 s longer.
    run.answer_s = [(i / 10, 0.51 + (0.5 if i in (23, 27) else 0.0)) for i in range(40)]
    slowest = run.slowest_seconds(0.5, n=2)
    assert slowest[0]["second"] == 2
    assert slowest[0]["max_ms"] == 510.0
    assert slowest[0]["slow"] == 2
    assert slowest[0]["answers"] == 10
    assert slowest[0]["wall"] == round(1000.0 + run.wall_offset + 2, 1)
    assert slowest[1]["max_ms"] == 10.0
    assert slowest[1]["slow"] == 0
