"""A steady trickle of whole clients on AIQ alone: what one answer costs, comparable across two trees.

    python -m bench.steady --rate 20 --step-s 10 [--modes longpoll,sse] [--profile TAG] [--output FILE]

One API process and one worker process on their own embedded PostgreSQL and Redis, the simulator at 0.5 s,
the client-side scenario's clients (bench/clientgen.py) at one rate per mode. Per mode: answers/s, the
overhead the clients saw (P50/P99), CPU-ms per answer by process, and counts that do not depend on how
busy the machine is: Redis commands per answer (INFO commandstats; a script's inner commands count too,
`evalsha` is the number of script calls), Redis round trips per answer (`redis_reads`: INFO stats
`total_reads_processed`, a pipeline arriving in one read), PostgreSQL transactions per answer
(pg_stat_database) and context switches per answer of the API and of the worker (`*_ctx_switches`, all
threads: hand-offs and wake-ups; the machine's load adds involuntary ones). Made for before/after comparisons
in one sitting: run it from each tree's own directory in turn (`cd <tree>`; `python -m` puts the current
directory first on sys.path, ahead of PYTHONPATH, and the processes it starts run from the tree it was loaded
from).
`--profile TAG` adds py-spy on the API and the worker for 12 s (PROFILE_S) at the same rate, in the last mode
(/tmp/profile-TAG-*.txt), and prints the worker's CPU-ms per answer by step (`bench/profiling.py` WORKER_STEPS).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import psutil
import psycopg2
import redis

from bench import profiling, report
from bench.context import Loadgen, RunContext
from bench.measures import client
from bench.pacing import NO_SPEED_PROBE_ENV, Clock, QuietGate, speed_probe
from bench.plan import Plan, say
from bench.stack import CpuMeter, Servers
from bench.systems import Layout, Simulator, System, aiq_api_env, start_aiq
from devkit.procs import Launcher

# Seconds of clients (and of py-spy) for `--profile`.
PROFILE_S = 12


def counts(servers: Servers, aiq: System) -> dict[str, int]:
    """Redis commands by name so far, Redis' reads of client input (`redis_reads`: round trips, near enough),
    and the run database's committed plus rolled-back transactions."""
    rc = redis.Redis.from_url(servers.redis)
    try:
        out = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in rc.info("commandstats").items()}
        # Reads of client input: about one per round trip (a pipeline's commands arrive in one read).
        out["redis_reads"] = int(rc.info("stats")["total_reads_processed"])
    finally:
        rc.close()
    # Context switches (voluntary and not) of each process tree: thread hand-offs and wake-ups, counted.
    for role, procs in (("api", aiq.api), ("worker", aiq.workers)):
        out[f"{role}_ctx_switches"] = sum(_ctx_switches(p) for proc in procs for p in proc.tree())
    with psycopg2.connect(aiq.db_url) as pc, pc.cursor() as cur:
        cur.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()")
        out["pg_transactions"] = int(cur.fetchone()[0])
    return out


def _ctx_switches(p: psutil.Process) -> int:
    """Over all the process's threads (/proc/PID/status counts only its first)."""
    total = 0
    for status in Path(f"/proc/{p.pid}/task").glob("*/status"):
        with contextlib.suppress(OSError):
            for line in status.read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[-1])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.steady", description=__doc__)
    ap.add_argument("--rate", type=int, default=20, help="client arrivals per second (default 20)")
    ap.add_argument("--step-s", type=float, default=10.0, help="seconds of arrivals per mode (default 10)")
    modes = "any of longpoll, wait (a submit with Prefer: wait), sse, chat (AIQ's /v1)"
    ap.add_argument("--modes", default="longpoll,sse", help=modes)
    ap.add_argument("--profile", metavar="TAG", help="py-spy the API and the worker afterwards")
    ap.add_argument("--output", type=Path)
    ap.add_argument("--aiq-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for AIQ's API and worker (repeatable), as bench.run's")  # fmt: skip
    args = ap.parse_args()
    plan = dataclasses.replace(Plan.make(True), client_rates=(args.rate,), client_step_s=args.step_s)
    tmp = Path(tempfile.mkdtemp(prefix="aiqs-", dir="/tmp"))
    logdir = tmp / "logs"
    logdir.mkdir()
    launcher = Launcher(logdir)
    servers: Servers | None = None
    probe = None if os.environ.get(NO_SPEED_PROBE_ENV) else {"before": speed_probe()}
    res: dict[str, Any] = {"rate": args.rate, "step_s": args.step_s}
    try:
        servers = Servers.start(tmp)
        sim = Simulator(launcher, {**os.environ, "PYTHONUNBUFFERED": "1"})
        layout = Layout(1, "reuseport", 1, tuple(args.aiq_env), ())
        env = aiq_api_env(layout, servers)
        ctx = RunContext(plan, QuietGate(0), Clock(3600), launcher, servers, sim, Loadgen(tmp), layout, env, False,
                         tmp, logdir)  # fmt: skip
        aiq = start_aiq(launcher, servers, sim, layout, env)
        sim.latency(client.UPSTREAM_MS)
        db = urllib.parse.urlparse(aiq.db_url).path.lstrip("/")
        meter = CpuMeter({"api": aiq.api, "worker": aiq.workers, "simulator": [sim.proc]}, databases=(db,))
        spec = {"port": aiq.api_port, "tokens": aiq.tokens, "body": json.dumps({"query": client.PROMPT,
                "model": client.MODEL}), "wait_s": 30}  # fmt: skip
        client._clients(ctx, {**spec, "mode": "longpoll", "rate": 10, "duration_s": 2})  # warm-up
        for mode in args.modes.split(","):
            aiq.settle(sim)
            time.sleep(1)
            before = counts(servers, aiq)
            mode_spec = {**spec, "mode": mode, **({"body": client.CHAT_BODY} if mode == "chat" else {})}
            r = client._steps(ctx, f"steady {mode}", mode_spec, meter, lambda: None)
            time.sleep(1.5)  # the last answers' bookkeeping
            after = counts(servers, aiq)
            n = max(1, r["steps"][0]["answered"])
            per = {k: round((after[k] - before.get(k, 0)) / n, 2) for k in after if after[k] != before.get(k, 0)}
            r["per_answer"] = dict(sorted(per.items(), key=lambda kv: -kv[1]))
            say(f"steady {mode}: per answer {json.dumps(r['per_answer'])}")
            res[mode] = r
        if args.profile:
            aiq.settle(sim)
            api_pids = [p for proc in aiq.api for p in (proc.child_pids() or [proc.pid])]
            spy = profiling.py_spy()
            if spy is not None:
                targets = {"api": api_pids[-1], "worker": aiq.workers[0].pid}
                started = profiling.record(spy, targets, PROFILE_S, Path("/tmp"), args.profile)
                profiled = client._clients(ctx, {**mode_spec, "rate": args.rate, "duration_s": PROFILE_S})
                res["profile"] = profiling.collect(started, PROFILE_S)
                steps = res["profile"].get("worker", {}).get("by_step_samples", {})
                say(f"worker CPU-ms per answer by step: {profiling.ms_per_answer(steps, profiled['answered'])}")
    finally:
        launcher.stop_all()
        if servers is not None:
            servers.drop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    if probe is not None:
        res["speed_probe_s"] = {**probe, "after": speed_probe()}
        say(report.speed_report(res["speed_probe_s"]))
    if args.output:
        args.output.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
