"""M2, server overhead: the time a completed row spent outside the upstream call, split at the claim."""

from __future__ import annotations

from typing import Any

from bench.context import RunContext
from bench.plan import say
from bench.systems import System


def measure_m2(ctx: RunContext, system: System, rate: float) -> dict[str, Any]:
    """Open-loop submits at `rate` with 0.2 s upstream latency; overhead from the rows."""
    ctx.sim.latency(200)
    system.settle(ctx.sim)
    ctx.gate.wait()
    meter = system.meter(ctx.sim)
    say(f"{system.name} M2: {rate:.0f}/s for {ctx.plan.m2_s:.0f} s at 0.2 s upstream latency")
    r = ctx.lg.run(system.submit_spec(rate, duration=ctx.plan.m2_s, warmup_s=0), meter)
    rows = system.wait_terminal(r["collected"], 60)
    stats = overhead_stats(rows)
    stats.update(
        {
            "rate": rate,
            "duration_s": ctx.plan.m2_s,
            "submit_p99_ms": r["latency_ms"]["p99"],
            "cpu": r.get("cpu"),
        }
    )
    say(
        f"{system.name} M2: overhead p50 {stats['p50_ms']} ms, p99 {stats['p99_ms']} ms over {stats['completed']} rows "
        f"(pickup p50 {stats['pickup']['p50_ms']} / p99 {stats['pickup']['p99_ms']} ms, after claim p50 "
        f"{stats['after_claim']['p50_ms']} / p99 {stats['after_claim']['p99_ms']} ms)"
    )
    return stats


def percentile(values: list[float], q: float) -> float | None:
    """The value at quantile `q` (nearest rank), None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _dist(values: list[float]) -> dict[str, float | None]:
    def q(p: float) -> float | None:
        v = percentile(values, p)
        return round(v, 2) if v is not None else None

    return {"p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "max_ms": round(max(values), 2) if values else None}


def overhead_stats(rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Server overhead per completed row: finished_at - created_at - llm_latency_ms, in ms.

    Split at started_at (set by the claim): `pickup` = started_at - created_at (API commit and
    publish, broker, worker dispatch, claim) and `after_claim` = finished_at - started_at -
    llm_latency_ms (claim commit, SDK and HTTP outside the timed call, the final write).
    """
    done = [r for r in rows if r[0] == "completed" and r[2] is not None and r[3] is not None]
    over = [(r[2] - r[1]).total_seconds() * 1000 - r[3] for r in done]
    pickup = [(r[4] - r[1]).total_seconds() * 1000 for r in done if r[4] is not None]
    after = [(r[2] - r[4]).total_seconds() * 1000 - r[3] for r in done if r[4] is not None]
    return {
        "rows": len(rows),
        "completed": len(over),
        **_dist(over),
        "pickup": _dist(pickup),
        "after_claim": _dist(after),
    }
