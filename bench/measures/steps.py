"""A measurement step: when it passes, when a failure earns a second try, what goes in the JSON; the rate search."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psutil

from bench.context import RunContext
from bench.plan import FOREIGN_RETRY_PCT, MAX_ERROR_RATE, SATURATED_PCT, say


def passes(result: dict[str, Any], p99_limit: float) -> bool:
    """A step passes within the P99 limit, with fewer than 0.1 % failed and 97 % of the offered rate served."""
    p99 = result["latency_ms"]["p99"]
    offered = result["offered_rps"] or 0
    return (
        p99 is not None
        and p99 <= p99_limit
        and result["errors"] + (result["total"] - result["ok"] - result["errors"]) <= MAX_ERROR_RATE * result["total"]
        and result["achieved_rps"] >= 0.97 * offered
    )


def foreign_pct(result: dict[str, Any]) -> float:
    """CPU (% of one core) used during a step by processes that are not part of this run."""
    return float(result.get("cpu", {}).get("pct_of_core", {}).get("other", 0.0))


def cpu_per_request(r: dict[str, Any]) -> dict[str, float] | None:
    """CPU-ms per request in a step: on the request path (API, PostgreSQL, Redis) and in all of this run.

    `cores * 1000 / all_ms` is what the machine could serve if nothing but CPU limited it: a figure that
    survives other people's load on a shared machine, unlike a latency percentile.
    """
    cpu = r.get("cpu", {}).get("cpu_s")
    if not cpu or not r.get("ok"):
        return None
    path = sum(cpu.get(k, 0.0) for k in ("api", "postgres", "redis"))
    everything = sum(v for k, v in cpu.items() if k not in ("other", "harness"))
    cores = psutil.cpu_count() or 1
    return {
        "request_path_ms": round(1000 * path / r["ok"], 3),
        "all_ms": round(1000 * everything / r["ok"], 3),
        "cpu_bound_capacity_rps": round(cores * r["ok"] / everything) if everything else None,
    }


def retry_reason(r: dict[str, Any]) -> str | None:
    """Why a failed step may deserve a second try, or None when it failed on its own account.

    Someone else's work taking a real share of the cores says nothing about the system under test. Nor
    does a failure while the machine had CPU to spare: that is a stall (seen on these VMs: 50-250 ms with
    the cores half idle, even with only the load generator and the simulator running), and a stall that
    belongs to the system fails the second try as well. A failure with the cores saturated is the limit.
    """
    if foreign_pct(r) > FOREIGN_RETRY_PCT:
        return f"{foreign_pct(r):.0f}% of a core went to other processes"
    busy = r.get("cpu", {}).get("machine_busy_pct")
    if busy is not None and busy < SATURATED_PCT:
        return f"the machine was only {busy:.0f}% busy (a stall, not saturation)"
    return None


def step_summary(r: dict[str, Any]) -> dict[str, Any]:
    """A step without the bulky fields, for the JSON report."""
    keep = {k: v for k, v in r.items() if k not in ("collected", "wall_start")}
    keep["cpu_per_request"] = cpu_per_request(r)
    return keep


def midpoint(passed: float, failed: float, grain: int) -> int | None:
    """The rate halfway between a passing and a failing one, on a multiple of `grain`; None if none lies between."""
    mid = round((passed + failed) / 2 / grain) * grain
    return mid if passed < mid < failed else None


def rate_search(
    ctx: RunContext,
    label: str,
    rates: tuple[int, ...],
    make_spec: Callable[[float], dict[str, Any]],
    run_step: Callable[[dict[str, Any]], dict[str, Any]],
    p99_limit: float,
    refine: bool,
    between: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Open-loop steps at increasing rates; the best is the highest rate meeting the P99 and error limits."""
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    failed_at: float | None = None
    for rate in rates:
        ctx.gate.wait()
        r = run_step(make_spec(rate))
        ok = passes(r, p99_limit)
        why = retry_reason(r)
        if not ok and why and ctx.clock.left() > 150:
            say(f"{label}: {rate}/s failed while {why}; retrying once")
            steps.append({**step_summary(r), "pass": ok, "retried": True})
            if between:
                between()
            ctx.gate.wait()
            r = run_step(make_spec(rate))
            ok = passes(r, p99_limit)
        steps.append({**step_summary(r), "pass": ok})
        say(
            f"{label}: {rate:>6.0f}/s offered -> {r['achieved_rps']:>7.1f}/s ok, p50 {r['latency_ms']['p50']} ms, "
            f"p99 {r['latency_ms']['p99']} ms, errors {r['errors']}, statuses {r['statuses']}, "
            f"CPU/request {(cpu_per_request(r) or {}).get('all_ms')} ms, busiest API process "
            f"{r.get('cpu', {}).get('busiest_process_pct', {}).get('api')}%, "
            f"machine {r.get('cpu', {}).get('machine_busy_pct')}% busy (not this run: "
            f"{r.get('cpu', {}).get('pct_of_core', {}).get('other')}% of a core) -> {'PASS' if ok else 'fail'}"
        )
        if between:
            between()
        if ok:
            best = r
        else:
            failed_at = rate
            break
    # Refining narrows the gap above the best step. When the first step already failed (a slow machine), one
    # step at half its rate is taken whether or not refining is on: a rate that held, rather than a 0.
    if failed_at is not None and (best is None or refine):
        mid = midpoint(best["offered_rps"] if best else 0, failed_at, 50)
        if mid is not None:
            ctx.gate.wait()
            r = run_step(make_spec(mid))
            ok = passes(r, p99_limit)
            steps.append({**step_summary(r), "pass": ok})
            verdict = "PASS" if ok else "fail"
            why = "refine" if best else "below the first step"
            say(f"{label}: {mid:>6.0f}/s offered ({why}) -> p99 {r['latency_ms']['p99']} ms -> {verdict}")
            if between:
                between()
            if ok:
                best = r
            else:
                failed_at = mid
    # The step that broke (the first failure), else the last one run.
    top = next((st for st in steps if not st["pass"] and not st.get("retried")), steps[-1] if steps else None)
    return {
        "max_rps": best["offered_rps"] if best else 0,
        "achieved_rps": best["achieved_rps"] if best else 0,
        "p99_ms": best["latency_ms"]["p99"] if best else None,
        "p50_ms": best["latency_ms"]["p50"] if best else None,
        "first_failing_rps": failed_at,
        "cpu_per_request_at_top": (top or {}).get("cpu_per_request"),
        "best": step_summary(best) if best else None,
        "top_step": top,
        "steps": steps,
    }
