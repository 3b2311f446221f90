"""The chaos smoke run is part of `make test`: 150 queries through a worker kill, a Redis restart without
persistence, a PostgreSQL immediate restart and every LLM fault kind, on the harness's own servers.

It runs `python -m bench.chaos.run --smoke` as a subprocess (its own process group, so a timeout here
stops every process it started) and reads the JSON report it writes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from devkit.paths import ROOT

SMOKE_BUDGET_SECONDS = 170  # the run targets <= 120 s; the rest is slack for a slow machine


@pytest.mark.timeout(SMOKE_BUDGET_SECONDS + 30)
def test_chaos_smoke_loses_nothing_and_never_rewrites_a_terminal_row(tmp_path: Path) -> None:
    report_path = tmp_path / "chaos-smoke.json"
    log_path = tmp_path / "chaos-smoke.out"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.chaos.run", "--smoke", "--report", str(report_path)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(SMOKE_BUDGET_SECONDS)
        except subprocess.TimeoutExpired:
            # SIGTERM lets the harness stop its stack; its watchdog covers a harness that hangs anyway.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            pytest.fail(f"chaos smoke did not finish in {SMOKE_BUDGET_SECONDS}s:\n{_tail(log_path)}")
    output = _tail(log_path)
    assert report_path.exists(), f"no report written (exit {proc.returncode}):\n{output}"
    report = json.loads(report_path.read_text())

    assert report["load"]["accepted"] > 0, output
    assert report["outcome"]["lost"] == 0, f"lost queries: {report['outcome']['lost_rows']}\n{output}"
    assert report["double_terminal_writes"]["total"] == 0, (
        f"terminal rows written twice: {report['double_terminal_writes']}\n{output}"
    )
    # No attempt called the LLM twice: every simulator call for a query id is matched by an attempt on its row.
    llm = report["llm"]
    assert llm["calls_beyond_attempts"] == 0, (
        f"LLM calls beyond attempts: {llm['calls_beyond_attempts_examples']}\n{output}"
    )
    # The faults really happened (a harness that injects nothing proves nothing).
    faults = report["faults"]
    assert faults["worker_kills"] >= 1, output
    assert faults["redis_restarts"] == 1, output
    assert faults["pg_restarts"] == 1, output
    assert not faults["fault_errors"], output


def _tail(path: Path, lines: int = 80) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
