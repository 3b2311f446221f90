"""Pacing on a shared machine: wait for other people's work to calm down, and keep to the run's time budget."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from bench.plan import say
from bench.stack import busiest_processes, machine_busy_pct


class QuietGate:
    """Before a measurement, wait (within a budget for the whole run) while the idle machine is busy.

    The system under test is idle between steps, so whatever keeps the cores busy then is someone
    else's work on a shared machine; measuring through it would only measure them.
    """

    def __init__(self, budget_s: float, limit_pct: float = 15.0) -> None:
        self.budget_s = budget_s
        self.limit_pct = limit_pct  # of the whole machine
        self.waited_s = 0.0
        self.checks: list[float] = []

    def wait(self, max_s: float = 20.0) -> float:
        """Wait while the machine is busier than the limit; how busy it was at the end."""
        busy = machine_busy_pct(0.5)
        waited = 0.0
        while busy > self.limit_pct and waited < max_s and self.waited_s < self.budget_s:
            busy = machine_busy_pct(1.0)
            waited += 1.0
            self.waited_s += 1.0
        self.checks.append(busy)
        return busy

    def summary(self) -> dict[str, Any]:
        """What the gate waited for over the run, for the JSON report."""
        return {
            "waited_s": self.waited_s,
            "budget_s": self.budget_s,
            "idle_machine_busy_pct_before_steps": self.checks,
        }


class Clock:
    """The run's time budget for optional measures (the plan's `budget_s`): one that would overrun it is skipped.
    The phases themselves always run (a full `make bench` takes 20-25 minutes, its client phase 10-11 of them)."""

    def __init__(self, budget_s: float) -> None:
        self.started = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def left(self) -> float:
        """Seconds left of the budget."""
        return self.budget_s - self.elapsed()

    def allows(self, seconds: float, what: str) -> bool:
        """Whether `seconds` of `what` still fit in the budget (says so when they do not)."""
        if self.left() >= seconds:
            return True
        say(f"skipping {what}: {self.left():.0f} s left of the run's budget")
        return False


def wait_quiet(limit_pct: float = 25, max_wait_s: float = 60) -> dict[str, Any]:
    """On a shared machine, wait (a little) for other people's work to calm down, and record it."""
    busy = machine_busy_pct(2)
    waited = 0.0
    if busy > limit_pct:
        say(f"machine already {busy:.0f}% busy before the run; busiest: {busiest_processes()}")
        while busy > limit_pct and waited < max_wait_s:
            busy = machine_busy_pct(5)
            waited += 5
        say(f"machine {busy:.0f}% busy after waiting {waited:.0f} s; starting")
    return {"busy_pct": busy, "waited_s": waited}


# A fixed pure-Python loop, timed in CPU seconds (lower is faster): the 2-core VMs this runs on differed by up to
# 3.5x from one session to the next, and drifted within one, so every run records it beside its figures.
SPEED_PROBE = "import time; t = time.process_time(); sum(range(3 * 10**7)); print(time.process_time() - t)"
# Set (by `bench.pair`) for a run that shares the machine with another: its probe would load the other's steps,
# and start it seconds later than the other; the run that drives both probes instead.
NO_SPEED_PROBE_ENV = "AIQ_BENCH_NO_SPEED_PROBE"


def speed_probe(repeats: int = 3) -> list[float]:
    """The machine's single-core speed now: SPEED_PROBE's CPU seconds, each in a fresh interpreter."""
    runs = (
        subprocess.run([sys.executable, "-c", SPEED_PROBE], capture_output=True, text=True, check=True)
        for _ in range(repeats)
    )
    return [round(float(run.stdout), 3) for run in runs]
