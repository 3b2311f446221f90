"""What the per-user submit limits cost: the same submits from users with limits on and with them off.

One stack, two groups of users. The `on` group has the (high) limits of the bench stack, so every submit
runs the limiter's Redis script and is never refused; the `off` group has an admin override of 0 for all
three limits, which skips Redis entirely. The steps alternate on, off, on, off at one rate with the workers
paused, so both groups see the same machine; the figure is CPU-ms per accepted submit on the request path
(API, PostgreSQL, Redis), and the API's share of it.
"""

from __future__ import annotations

import signal
import statistics
from typing import Any

from bench.context import RunContext
from bench.measures.steps import cpu_per_request, step_summary
from bench.plan import say
from bench.systems import System


def measure_limits_cost(ctx: RunContext, system: System, rate: int) -> dict[str, Any]:
    """Submit CPU per request with the limits on and off, alternating, at `rate` submits/s."""
    groups = {"on": system.tokens, "off": system.unlimited_tokens}
    say(f"{system.name} limits cost: {rate}/s submits, limits on vs off, alternating, workers paused")
    steps: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for w in system.workers:
        w.popen.send_signal(signal.SIGSTOP)
    try:
        meter = system.meter(ctx.sim)
        for group in ("on", "off", "on", "off"):
            ctx.gate.wait()
            spec = system.submit_spec(rate, duration=ctx.plan.step_s, warmup_s=ctx.plan.warmup_s)
            spec["requests"] = [{**spec["requests"][0], "headers": _auth(t)} for t in groups[group]]
            r = ctx.lg.run(spec, meter)
            steps[group].append(r)
            cost = cpu_per_request(r)
            say(f"  limits {group}: {r['achieved_rps']:.0f}/s ok, {cost and cost['request_path_ms']} CPU-ms/request")
            system.purge()
    finally:
        system.purge()
        for w in system.workers:
            w.popen.send_signal(signal.SIGCONT)
    system.settle(ctx.sim)
    summary: dict[str, Any] = {"rate": rate}
    for group, results in steps.items():
        costs = [c for c in (cpu_per_request(r) for r in results) if c]
        api_ms = [1000 * r["cpu"]["cpu_s"]["api"] / r["ok"] for r in results if r.get("ok")]
        summary[group] = {
            "request_path_ms": statistics.median(c["request_path_ms"] for c in costs) if costs else None,
            "api_ms": round(statistics.median(api_ms), 3) if api_ms else None,
            "steps": [step_summary(r) for r in results],
        }
    on, off = summary["on"]["request_path_ms"], summary["off"]["request_path_ms"]
    summary["added_request_path_ms"] = round(on - off, 3) if on is not None and off is not None else None
    return summary


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
