"""P0, the limit: the load generator calls the simulator directly."""

from __future__ import annotations

import json
from typing import Any

from bench.context import RunContext
from bench.measures.steps import rate_search, step_summary
from bench.plan import M1_P99_MS, MODEL, PROMPT, say
from bench.stack import SIM_API_KEY, CpuMeter


def measure_p0(ctx: RunContext) -> dict[str, Any]:
    """The limit: the simulator's own request rate (latency 0) and its completions/s at 0.5 s, direct."""
    meter = CpuMeter({"simulator": [ctx.sim.proc]})
    chat = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": PROMPT + " [[sim latency_ms=0]]"}]})
    headers = {"Authorization": f"Bearer {SIM_API_KEY}", "Content-Type": "application/json"}

    def spec(rate: float) -> dict[str, Any]:
        return {
            "port": ctx.sim.port,
            "requests": [{"method": "POST", "path": "/v1/chat/completions", "headers": headers, "body": chat}],
            "rate": rate,
            "duration_s": ctx.plan.step_s,
            "warmup_s": ctx.plan.warmup_s,
            "max_connections": 256,
        }

    say("P0: simulator request rate (latency 0)")
    m1 = rate_search(ctx, "P0 chat", ctx.plan.p0_rates, spec, lambda s: ctx.lg.run(s, meter), M1_P99_MS, False)
    ctx.sim.latency(500)
    ctx.sim.reset()
    n = ctx.plan.m4_aiq
    slow = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]})
    burst = {
        "port": ctx.sim.port,
        "requests": [{"method": "POST", "path": "/v1/chat/completions", "headers": headers, "body": slow}],
        "rate": 0,
        "count": n,
        "max_connections": 1000,
        "timeout_s": 60,
    }
    r = ctx.lg.run(burst, meter)
    stats = ctx.sim.stats()
    rate = round(r["ok"] / r["elapsed_s"], 1)
    say(f"P0: {n} calls at 0.5 s with 1,000 connections -> {rate}/s, max in flight {stats['max_in_flight']}")
    return {
        "m1": m1,
        "m4": {
            "count": n,
            "completions_per_s": rate,
            "max_in_flight": stats["max_in_flight"],
            "loadgen": step_summary(r),
        },
    }
