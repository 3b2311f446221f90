"""`make bench` / `make bench-quick`: AIQ against the simulator's limit (P0) and the textbook stack (P1).

One run, one machine, everything on it: PostgreSQL and Redis (TEST_DATABASE_URL / TEST_REDIS_URL, else
embedded), the LLM simulator, the API (`--api-workers` uvicorn processes), the worker(s), and an open-loop
load generator in its own process (bench/loadgen.py). Prints a table and writes bench/results/latest.json.
See docs/benchmarks.md for what each figure means and how it is measured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report
from bench.context import Loadgen, RunContext
from bench.measures.client import run_client
from bench.measures.p0 import measure_p0
from bench.measures.provider import run_provider
from bench.pacing import Clock, QuietGate, speed_probe, wait_quiet
from bench.phases import run_aiq, run_naive, run_sse
from bench.plan import KEEP_LOG_RUNS, RESULTS, Plan, say
from bench.stack import Servers
from bench.systems import Layout, Simulator, aiq_api_env
from devkit.paths import ROOT
from devkit.procs import Launcher

# The systems a run may measure, in the order it measures them.
PHASES = {
    "p0": measure_p0,
    "naive": run_naive,
    "aiq": run_aiq,
    "sse": run_sse,
    "client": run_client,
    "provider": run_provider,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short run (about 5 min) for a smoke check")
    ap.add_argument("--api-workers", type=int, default=2, help="API processes; default 2")
    ap.add_argument(
        "--api-mode",
        choices=("reuseport", "workers"),
        default="reuseport",
        help="reuseport: N uvicorn processes on SO_REUSEPORT sockets, one port (default); workers: uvicorn --workers N",
    )
    ap.add_argument(
        "--workers", type=int, default=1, help="AIQ worker processes, default configuration each; default 1"
    )
    ap.add_argument(
        "--systems",
        default="p0,naive,aiq,client,provider",
        help="comma-separated subset of p0,naive,aiq,sse,client,provider (sse: only the SSE measures, on a fresh AIQ; "
        "client: the client-side scenario with LiteLLM beside AIQ; provider: issue 11's provider-limited scenario)",
    )
    ap.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="py-spy the API and worker under submit load (default: on in the full run)",
    )
    ap.add_argument(
        "--aiq-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for AIQ's processes (e.g. DB_POOL_SIZE=10); reported in the JSON",
    )
    ap.add_argument(
        "--api-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for AIQ's API processes only (overrides the pool sizing)",
    )
    ap.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    return ap.parse_args(argv)


def new_logdir() -> Path:
    """This run's log directory; worker logs run to tens of MB per run, so only the last few runs are kept."""
    logdir = RESULTS / "logs" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    logdir.mkdir(parents=True, exist_ok=True)
    for old in sorted((RESULTS / "logs").iterdir())[:-KEEP_LOG_RUNS]:
        shutil.rmtree(old, ignore_errors=True)
    return logdir


def main(argv: list[str] | None = None) -> int:
    """Run the phases of the systems asked for, then write the JSON and print the table."""
    args = parse_args(argv)
    plan = Plan.make(args.quick)
    clock, gate = Clock(plan.budget_s), QuietGate(plan.gate_budget_s)
    layout = Layout(args.api_workers, args.api_mode, args.workers, tuple(args.aiq_env), tuple(args.api_env))
    systems = set(args.systems.split(","))
    logdir = new_logdir()
    tmp = Path(tempfile.mkdtemp(prefix="aiqb-", dir="/tmp"))
    launcher = Launcher(logdir)
    servers: Servers | None = None
    j: dict[str, Any] = {}
    details: dict[str, Any] = {}
    try:
        say(f"{plan.mode} run; logs in {logdir.relative_to(ROOT)}")
        j["machine_before_run"] = wait_quiet(max_wait_s=plan.quiet_wait_s)
        j["speed_probe_s"] = {"before": speed_probe()}
        servers = Servers.start(tmp)
        sim = Simulator(launcher, {**os.environ, "PYTHONUNBUFFERED": "1"})
        j["machine"] = report.machine_info(servers)
        api_env = aiq_api_env(layout, servers)
        j["config"] = report.run_config(plan, layout, api_env)
        profile = (not args.quick) if args.profile is None else args.profile
        ctx = RunContext(plan, gate, clock, launcher, servers, sim, Loadgen(tmp), layout, api_env, profile, tmp, logdir)
        for name, phase in PHASES.items():
            if name in systems:
                details[name] = phase(ctx)
        j["speed_probe_s"]["after"] = speed_probe()
        j.update(report.headline(details))
        j["quiet_gate"] = gate.summary()
        j["elapsed_s"] = round(clock.elapsed(), 1)
        j["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    finally:
        launcher.stop_all()
        if servers is not None:
            servers.drop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    report.write({**j, "details": details}, args.output, logdir)
    report.show(j, details, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
