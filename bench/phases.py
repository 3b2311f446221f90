"""What each system goes through, in order: the reference stack (P1) and AIQ; P0 is a single measure."""

from __future__ import annotations

from typing import Any

from bench.context import RunContext
from bench.measures.batch import measure_batch
from bench.measures.limits import measure_limits_cost
from bench.measures.m1 import measure_m1, measure_m1_api_only
from bench.measures.m2 import measure_m2
from bench.measures.m3 import measure_m3
from bench.measures.m4 import measure_m4
from bench.measures.m5 import measure_m5
from bench.measures.publish import amqp_url, measure_publish
from bench.measures.sse import measure_sse
from bench.measures.webhooks import measure_webhook_lag
from bench.measures.wrk import measure_wrk
from bench.plan import say
from bench.profiling import profile
from bench.systems import System, start_aiq, start_naive


def warm_up(ctx: RunContext, system: System) -> None:
    """A few requests through fresh processes, so first-use costs (imports, caches) stay out of the figures."""
    r = ctx.lg.run(system.submit_spec(0, count=12, max_connections=4, timeout_s=60))
    system.wait_terminal(r["collected"], 10)
    ids = system.ids_with_tokens(12)
    if ids:
        ctx.lg.run(system.poll_spec(0, 1, ids, count=40, max_connections=4))
    system.settle(ctx.sim)


def run_naive(ctx: RunContext) -> dict[str, Any]:
    """P1: M1 on one stack, then M4, M2 and M5 on a fresh one; each measure's summary by name."""
    plan = ctx.plan
    say("P1: starting the reference stack (bench/naive)")
    naive = start_naive(ctx.launcher, ctx.servers, ctx.sim, ctx.layout)
    warm_up(ctx, naive)
    n: dict[str, Any] = {}
    n["m1"] = measure_m1(ctx, naive, plan.naive_m1_rates, refine=False)
    # Overloaded sync workers keep draining requests (and Celery keeps its prefetched tasks) long
    # after the load stops: a fresh stack (database, queue, processes) is quicker than waiting.
    ctx.launcher.stop_group([*naive.workers, *naive.api], timeout=5)
    ctx.sim.wait_idle(timeout=20)
    naive = start_naive(ctx.launcher, ctx.servers, ctx.sim, ctx.layout)
    warm_up(ctx, naive)
    n["m4"] = measure_m4(ctx, plan.m4_naive, naive, timeout=120)
    if plan.naive_m2:
        rate = max(1.0, round(0.5 * min(n["m1"]["max_rps"] or 1e9, n["m4"]["per_s"] or 1), 1))
        n["m2"] = measure_m2(ctx, naive, rate)
    if plan.naive_m5_rates:
        n["m5"] = measure_m5(ctx, naive, plan.naive_m5_rates, refine=False)
    ctx.launcher.stop_group([*naive.workers, *naive.api], timeout=10)
    return n


def run_sse(ctx: RunContext) -> dict[str, Any]:
    """`--systems sse`: AIQ on its own, only the SSE measures (TTFT at the client, held streams)."""
    layout = ctx.layout
    say(f"SSE: starting AIQ's API ({layout.api_workers} process(es)) and {layout.workers} worker process(es)")
    aiq = start_aiq(ctx.launcher, ctx.servers, ctx.sim, layout, ctx.aiq_api_env)
    warm_up(ctx, aiq)
    result = {"sse": measure_sse(ctx, aiq, 20 if ctx.plan.quick else 50)}
    ctx.launcher.stop_group([*aiq.workers, *aiq.api], timeout=10)
    return result


def run_aiq(ctx: RunContext) -> dict[str, Any]:
    """AIQ: M1 (and, time allowing, its API-only and wrk variants), M4, M2, M5, the profile, M3 last."""
    plan, layout = ctx.plan, ctx.layout
    say(f"AIQ: starting API ({layout.api_workers} process(es)) and {layout.workers} worker process(es)")
    aiq = start_aiq(ctx.launcher, ctx.servers, ctx.sim, layout, ctx.aiq_api_env)
    warm_up(ctx, aiq)
    a: dict[str, Any] = {}
    a["m1"] = measure_m1(ctx, aiq, plan.aiq_m1_rates)
    # Half of the M1 maximum: a load the API serves comfortably, so CPU per request is not inflated by queueing.
    a["limits_cost"] = measure_limits_cost(ctx, aiq, max(100, round(0.5 * (a["m1"]["max_rps"] or 200) / 50) * 50))
    if ctx.clock.allows(60, "the batch measure"):
        a["batch"] = measure_batch(ctx, aiq, lines=300 if plan.quick else 2000)
    # The API's publish on its own, Redis beside RabbitMQ (BENCH_AMQP_URL / TEST_AMQP_URL): a few seconds.
    ctx.gate.wait()
    say("publish cost: Publisher.publish to Redis and to RabbitMQ, sequential and 64 in flight")
    a["publish"] = measure_publish(ctx.servers.redis, amqp_url(), quick=plan.quick)
    # Still to come after the optional phases: M4, M2, M5, M3 (about 150 s in the full run).
    if not plan.quick and ctx.clock.allows(200, "the API-only M1 sweep"):
        a["m1_api_only"] = measure_m1_api_only(ctx, aiq, a["m1"]["max_rps"] or 100)
    if plan.wrk and ctx.clock.allows(170, "the wrk cross-check"):
        aiq.settle(ctx.sim)
        a["m1_wrk_closed_loop"] = measure_wrk(ctx, aiq, 6, 32)
        aiq.settle(ctx.sim)
    a["m4"] = measure_m4(ctx, plan.m4_aiq, aiq, timeout=180)
    max_load = min(a["m1"]["max_rps"] or 1e9, a["m4"]["per_s"] or 1e9)
    a["m2"] = measure_m2(ctx, aiq, round(0.5 * max_load / 10) * 10 or 10)
    a["m2"]["max_load_basis"] = (
        "M1 max submit rate"
        if (a["m1"]["max_rps"] or 1e9) <= (a["m4"]["per_s"] or 1e9)
        else "M4 completions/s (the workers' capacity is below the submit capacity)"
    )
    a["m5"] = measure_m5(ctx, aiq, plan.aiq_m5_rates)
    if ctx.clock.allows(40, "the webhook lag"):
        a["webhook_lag"] = measure_webhook_lag(ctx, aiq, 20, 5 if plan.quick else 10)
    if ctx.clock.allows(60, "the SSE measures"):
        a["sse"] = measure_sse(ctx, aiq, max(10, round(0.5 * (a["m4"]["per_s"] or 20))))
    if ctx.profile and ctx.clock.allows(75, "the profile"):
        rate = max(50, round(0.9 * (a["m1"]["max_rps"] or 100) / 10) * 10)
        a["profile"] = profile(ctx, aiq, rate)
    # Last: it leaves a thousand 10 s calls to finish.
    a["m3"] = measure_m3(ctx, aiq)
    return a
