"""M1, submit throughput: with the workers running, and with them paused (the API's own limit)."""

from __future__ import annotations

import signal
from typing import Any

from bench.context import RunContext
from bench.measures.steps import rate_search
from bench.plan import M1_P99_MS, say
from bench.systems import System


def measure_m1(ctx: RunContext, system: System, rates: tuple[int, ...], refine: bool = True) -> dict[str, Any]:
    """Submit throughput: a rate search on authenticated submits with the workers running, simulator at 0.5 s."""
    ctx.sim.latency(500)
    meter = system.meter(ctx.sim)
    say(f"{system.name} M1: authenticated POST /api/v1/query, open loop, workers running (simulator 0.5 s)")
    return rate_search(
        ctx,
        f"{system.name} M1 submit",
        rates,
        lambda rate: system.submit_spec(rate, duration=ctx.plan.step_s, warmup_s=ctx.plan.warmup_s),
        lambda s: ctx.lg.run(s, meter),
        M1_P99_MS,
        ctx.plan.refine and refine,
        between=lambda: system.settle(ctx.sim),
    )


def measure_m1_api_only(ctx: RunContext, system: System, start_rps: float) -> dict[str, Any] | None:
    """M1 again with the worker stopped (SIGSTOP): the API's own limit, without the worker's CPU next to it."""
    rates = tuple(int(start_rps * f) for f in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0) if start_rps * f >= 50)
    if not rates:
        return None
    say(f"{system.name} M1 (API only, worker paused): same load, nobody consumes the queue")
    for w in system.workers:
        w.popen.send_signal(signal.SIGSTOP)
    try:
        meter = system.meter(ctx.sim)
        result = rate_search(
            ctx,
            f"{system.name} M1 api-only",
            rates,
            lambda rate: system.submit_spec(rate, duration=ctx.plan.step_s, warmup_s=ctx.plan.warmup_s),
            lambda s: ctx.lg.run(s, meter),
            M1_P99_MS,
            False,
            between=system.purge,
        )
    finally:
        system.purge()
        for w in system.workers:
            w.popen.send_signal(signal.SIGCONT)
    system.settle(ctx.sim)
    return result
