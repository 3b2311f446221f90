"""M5, poll throughput: a rate search on reading existing rows."""

from __future__ import annotations

from typing import Any

from bench.context import RunContext
from bench.measures.steps import rate_search
from bench.plan import M5_P99_MS, say
from bench.systems import System


def measure_m5(ctx: RunContext, system: System, rates: tuple[int, ...], refine: bool = True) -> dict[str, Any]:
    """Poll throughput: a rate search on GET /api/v1/query/{id} over completed rows, each with its owner's token."""
    ids = system.ids_with_tokens(2000)
    meter = system.meter(ctx.sim)
    say(f"{system.name} M5: GET /api/v1/query/{{id}} over {len(ids)} existing rows, open loop")
    return rate_search(
        ctx,
        f"{system.name} M5 poll",
        rates,
        lambda rate: system.poll_spec(rate, ctx.plan.step_s, ids, warmup_s=ctx.plan.warmup_s),
        lambda s: ctx.lg.run(s, meter),
        M5_P99_MS,
        ctx.plan.refine and refine,
    )
