"""Narrowing a rate search between its last passing step and the first failing one (pure logic)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from bench.measures.client import next_refinement
from bench.measures.steps import midpoint, rate_search


def _steps(**verdicts: bool) -> list[dict[str, Any]]:
    return [{"rate": int(rate.removeprefix("r")), "ok": ok} for rate, ok in verdicts.items()]


def test_the_midpoint_lies_strictly_between_on_the_grain() -> None:
    assert midpoint(20, 40, 5) == 30
    assert midpoint(100, 125, 5) == 110  # 112.5 rounds to the grain
    assert midpoint(400, 600, 50) == 500
    assert midpoint(150, 200, 50) is None  # 175 rounds to 200: nothing new between
    assert midpoint(20, 25, 5) is None


def test_the_next_step_halves_the_gap_above_the_highest_pass() -> None:
    assert next_refinement(_steps(r10=True, r20=True, r40=False)) == 30
    # A noisy failure below the top does not count; the gap is above the highest pass.
    assert next_refinement(_steps(r60=True, r80=False, r100=True, r125=False, r150=False)) == 110
    # After a refining step, the gap is narrower still.
    assert next_refinement(_steps(r20=True, r40=False, r30=True)) == 35
    assert next_refinement(_steps(r20=True, r40=False, r30=False)) == 25


def test_nothing_to_narrow_without_both_ends() -> None:
    assert next_refinement(_steps(r10=False, r20=False)) is None  # nothing passed
    assert next_refinement(_steps(r10=True, r20=True)) is None  # nothing failed above
    assert next_refinement(_steps(r20=True, r25=False)) is None  # one grain apart


def test_series_take_each_rate_in_turn_then_refine_in_turn() -> None:
    import dataclasses

    from bench.measures.client import Series, run_series
    from bench.plan import Plan

    order: list[tuple[str, int, bool]] = []

    class Fake(Series):
        """Passes below `limit`; a step at twice the limit or more is well past the bound (it stops)."""

        def __init__(self, label: str, limit: int) -> None:
            self.label, self.limit = label, limit
            self.steps: list[dict[str, Any]] = []
            self.stopped = False

        def step(self, rate: float, refining: bool = False) -> None:
            order.append((self.label, int(rate), refining))
            self.steps.append({"rate": rate, "ok": rate < self.limit})
            self.stopped = self.stopped or rate >= 2 * self.limit

    plan = dataclasses.replace(Plan.make(True), client_rates=(10, 20, 40, 80), refine=True)
    run_series(plan, [Fake("aiq", 50), Fake("peer", 15)])
    assert order == [
        ("aiq", 10, False),
        ("peer", 10, False),
        ("aiq", 20, False),
        ("peer", 20, False),  # fails, not yet far past
        ("aiq", 40, False),
        ("peer", 40, False),  # far past: the peer takes no more plain steps
        ("aiq", 80, False),
        # Refining rounds, in turn: the aiq between 40 and 80, the peer between 10 and 20.
        ("aiq", 60, True),
        ("peer", 15, True),
        ("aiq", 50, True),
    ]


def _search(limit: float, rates: tuple[int, ...], refine: bool) -> tuple[dict[str, Any], list[float]]:
    """`rate_search` on a fake system that holds below `limit`/s (the machine busy: failures are not retried)."""
    offered: list[float] = []

    def run_step(spec: dict[str, Any]) -> dict[str, Any]:
        rate = spec["rate"]
        offered.append(rate)
        held = rate < limit
        return {
            "offered_rps": rate,
            "achieved_rps": rate if held else limit,
            "total": 100,
            "ok": 100,
            "errors": 0,
            "latency_ms": {"p50": 5.0, "p99": 10.0 if held else 900.0},
            "statuses": {"202": 100},
            "cpu": {"machine_busy_pct": 99.0},
        }

    ctx = SimpleNamespace(gate=SimpleNamespace(wait=lambda: None), clock=SimpleNamespace(left=lambda: 1e9))
    result = rate_search(ctx, "fake", rates, lambda r: {"rate": r}, run_step, 50.0, refine)  # type: ignore[arg-type]
    return result, offered


def test_a_failed_first_step_is_followed_by_one_at_half_its_rate() -> None:
    result, offered = _search(150, (200, 400), refine=False)
    assert offered == [200, 100]
    assert result["max_rps"] == 100
    assert result["first_failing_rps"] == 200


def test_below_the_first_step_a_failure_still_reads_zero() -> None:
    result, offered = _search(30, (200, 400), refine=True)
    assert offered == [200, 100]
    assert result["max_rps"] == 0
    assert result["first_failing_rps"] == 100


def test_without_refining_a_search_that_passed_once_stops_at_its_first_failure() -> None:
    result, offered = _search(300, (200, 400), refine=False)
    assert offered == [200, 400]
    assert result["max_rps"] == 200
    result, offered = _search(350, (200, 400), refine=True)
    assert offered == [200, 400, 300]
    assert result["max_rps"] == 300
