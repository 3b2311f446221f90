"""M4, completions/s at 0.5 s: a burst through the API, timed from the rows, with its CPU per query."""

from __future__ import annotations

import threading
from typing import Any

from bench.context import RunContext
from bench.plan import say
from bench.stack import CpuMeter
from bench.systems import System


def measure_m4(ctx: RunContext, n: int, system: System, timeout: float) -> dict[str, Any]:
    """A burst at 0.5 s upstream latency: completions/s from finished_at, CPU-ms per query from psutil."""
    ctx.sim.latency(500)
    system.settle(ctx.sim)
    ctx.sim.reset()
    ctx.gate.wait()
    meter = system.meter(ctx.sim)
    rss_max = {"worker": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss_max["worker"] = max(rss_max["worker"], sum(w.rss_mb() for w in system.workers))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    before = meter.snapshot()
    r = ctx.lg.run(system.submit_spec(0, count=n, max_connections=64, timeout_s=120))
    ids = r["collected"]
    rows = system.wait_terminal(ids, timeout)
    cpu = CpuMeter.delta(before, meter.snapshot(), {"loadgen": r["cpu_s"]})
    stop.set()
    sampler.join()
    stats = ctx.sim.stats()
    rate = completion_rate(rows)
    app_cpu = cpu["cpu_s"].get("api", 0) + cpu["cpu_s"].get("worker", 0)
    done = max(1, rate["completed"])
    out = {
        "count": n,
        "submitted": len(ids),
        "submit_elapsed_s": r["elapsed_s"],
        "submit_rps": round(len(ids) / r["elapsed_s"], 1) if r["elapsed_s"] else None,
        **rate,
        "cpu_ms_per_query": round(1000 * app_cpu / done, 2),
        "cpu_ms_per_query_api": round(1000 * cpu["cpu_s"].get("api", 0) / done, 2),
        "cpu_ms_per_query_worker": round(1000 * cpu["cpu_s"].get("worker", 0) / done, 2),
        "cpu_ms_per_query_postgres": round(1000 * cpu["cpu_s"].get("postgres", 0) / done, 2),
        "cpu_ms_per_query_redis": round(1000 * cpu["cpu_s"].get("redis", 0) / done, 2),
        "cpu": cpu,
        "max_in_flight": stats["max_in_flight"],
        "worker_rss_mb_max": round(rss_max["worker"], 1),
        "loadgen_cpu_s": r["cpu_s"],
    }
    say(
        f"{system.name} M4: {rate['completed']}/{n} completed, {rate['per_s']}/s "
        f"(middle 80 %: {rate['steady_per_s']}/s, from first submit: {rate['end_to_end_per_s']}/s), "
        f"{out['cpu_ms_per_query']} CPU-ms/query "
        f"(api {out['cpu_ms_per_query_api']}, worker {out['cpu_ms_per_query_worker']}), "
        f"max in flight {stats['max_in_flight']}, machine {cpu['machine_busy_pct']}% busy"
    )
    return out


def completion_rate(rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Completions/s from the rows' finished_at: over all of them, over the middle 80 %, and end to end."""
    done = sorted(r[2] for r in rows if r[0] == "completed" and r[2] is not None)
    created = sorted(r[1] for r in rows)
    if len(done) < 2:
        return {"completed": len(done), "per_s": 0.0, "end_to_end_per_s": 0.0, "steady_per_s": 0.0}
    finish_span = (done[-1] - done[0]).total_seconds()
    span = (done[-1] - created[0]).total_seconds()
    lo, hi = int(0.1 * len(done)), int(0.9 * len(done)) - 1
    steady_span = (done[hi] - done[lo]).total_seconds()
    return {
        "completed": len(done),
        "failed": sum(1 for r in rows if r[0] != "completed"),
        "span_s": round(span, 3),
        "per_s": round((len(done) - 1) / finish_span, 1) if finish_span > 0 else 0.0,
        "end_to_end_per_s": round(len(done) / span, 1) if span > 0 else 0.0,
        "steady_per_s": round((hi - lo) / steady_span, 1) if steady_span > 0 else 0.0,
    }
