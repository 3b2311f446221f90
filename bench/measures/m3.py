"""M3, calls in flight per worker: 10 s upstream calls, the simulator's in-flight count and the worker's RSS."""

from __future__ import annotations

import json
import time
from typing import Any

from bench.context import RunContext
from bench.plan import say
from bench.systems import System


def measure_m3(ctx: RunContext, system: System) -> dict[str, Any]:
    """1,200+ queries per worker process at 10 s upstream latency: calls in flight and worker RSS.

    Sampled every 250 ms: the simulator's `in_flight` (every call of every worker) and the RSS of each
    worker's process tree (process + children). Per worker: in flight / workers, the largest tree's RSS.
    """
    ctx.sim.latency(10_000)
    system.settle(ctx.sim)
    ctx.sim.reset()
    ctx.gate.wait()
    workers = len(system.workers)
    count = ctx.plan.m3_count * workers
    rss_idle = max(w.rss_mb() for w in system.workers)
    proc, out_path = ctx.lg.start(system.submit_spec(0, count=count, max_connections=64, timeout_s=60))
    samples: list[tuple[float, int, float, int]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 25:
        st = ctx.sim.stats()
        rss = max(w.rss_mb() for w in system.workers)
        threads = max(sum(p.num_threads() for p in w.tree()) for w in system.workers)
        samples.append((round(time.monotonic() - t0, 2), st["in_flight"], round(rss, 1), threads))
        if proc.poll() is not None and st["in_flight"] == 0 and time.monotonic() - t0 > 5:
            break
        # Once the calls started 10 s ago start finishing, the peak is behind us.
        if time.monotonic() - t0 > 12 and st["in_flight"] < max(s[1] for s in samples) * 0.5:
            break
        time.sleep(0.25)
    proc.wait(60)
    r = json.loads(out_path.read_text())
    peak = max(max(s[1] for s in samples), ctx.sim.stats()["max_in_flight"])
    rss_max = max(s[2] for s in samples)
    at_peak = [s for s in samples if s[1] >= 0.95 * peak]
    reached = next((s[0] for s in samples if s[1] >= 1000 * workers), None)
    first_at_peak = next((s[0] for s in samples if s[1] == peak), None)
    out = {
        "worker_processes": workers,
        "count": count,
        "submitted": r["ok"],
        "submit_elapsed_s": r["elapsed_s"],
        "max_in_flight": peak,
        "in_flight_per_worker": round(peak / workers),
        "seconds_to_1000_per_worker": reached,
        "seconds_to_peak": first_at_peak,
        # How fast the workers take calls on: in-flight count over the first 5 s.
        "claims_per_s_first_5s": round(max((s[1] for s in samples if s[0] <= 5), default=0) / 5, 1),
        "worker_rss_mb_max": rss_max,
        "worker_rss_mb_at_peak": max((s[2] for s in at_peak), default=None),
        "worker_rss_mb_idle": round(rss_idle, 1),
        "worker_threads_max": max(s[3] for s in samples),
        "samples": samples,
    }
    say(
        f"{system.name} M3: peak {peak} calls in flight ({out['in_flight_per_worker']} per worker process), "
        f"worker tree RSS {rss_max} MB (idle {out['worker_rss_mb_idle']} MB), {out['worker_threads_max']} threads"
    )
    # Cancel what never started, let the 10 s calls finish: the next step starts from quiet.
    system.purge()
    ctx.sim.wait_idle(timeout=20)
    ctx.sim.latency(500)
    return out
