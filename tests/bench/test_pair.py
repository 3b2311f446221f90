"""bench.pair's summary of paired rounds (pure logic; the runs themselves are `bench.steady`'s)."""

from __future__ import annotations

from typing import Any

from bench.pair import summarize, table


def _steady(api: float, worker: float, p50: float, p99: float) -> dict[str, Any]:
    step = {
        "cpu_ms_per_answer": {"api": api, "worker": worker, "simulator": 1.0},
        "overhead_ms": {"p50": p50, "p90": p99 - 1, "p99": p99},
        "answers_per_s": 20.0,
        "errors": 0,
    }
    return {"wait": {"steps": [step]}}


def test_each_figure_is_paired_round_by_round() -> None:
    rounds = [
        {"before": _steady(6.0, 10.0, 20.0, 40.0), "after": _steady(5.5, 10.5, 19.0, 50.0)},
        {"before": _steady(7.0, 12.0, 22.0, 30.0), "after": _steady(6.9, 11.0, 23.0, 30.0)},
    ]
    paired = summarize(rounds, ["wait"])["wait"]["paired"]
    assert paired["api"] == {"mean_before": 6.5, "mean_after": 6.2, "mean_diff": -0.3, "after_lower": 2}
    assert paired["worker"] == {"mean_before": 11.0, "mean_after": 10.75, "mean_diff": -0.25, "after_lower": 1}
    # Equal is not lower.
    assert paired["p99"]["after_lower"] == 0
    assert paired["p99"]["mean_diff"] == 5.0


def test_the_table_shows_every_round_and_the_paired_means() -> None:
    rounds = [{"before": _steady(6.0, 10.0, 20.0, 40.0), "after": _steady(5.0, 9.0, 19.0, 41.0)}]
    text = table(summarize(rounds, ["wait"]))
    assert "round 1: 6.00 / 10.00, 20.0 / 40.0  ->  5.00 / 9.00, 19.0 / 41.0" in text
    assert "api: 6.0 -> 5.0 (mean paired difference -1.0, after lower in 1 of 1)" in text
