"""`python -m bench.chaos.run` (`make chaos`): run the chaos experiment, print a table, write a JSON report.

    python -m bench.chaos.run                      # full run: 2,000 queries, 300 s of faults
    python -m bench.chaos.run --smoke              # 150 queries, ~40 s of faults, under 2 minutes
    python -m bench.chaos.run --queries 500 --duration 120 --keep-logs /tmp/chaos-logs
    python -m bench.chaos.run --broker rabbitmq    # RabbitMQ as the broker, restarted instead of Redis

Exit status: 0 when nothing was lost, no terminal row was written twice and the drain stayed within
its bound; 1 otherwise; 2 when the harness itself could not run; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from bench.chaos.harness import ChaosConfig, ChaosRun
from bench.chaos.report import format_table


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    d = ChaosConfig()
    p = argparse.ArgumentParser(
        prog="python -m bench.chaos.run",
        description="Run AIQ (API, workers, simulator) on its own PostgreSQL and Redis under kills, restarts and "
        "LLM faults; report lost queries, double terminal writes, extra LLM calls and drain time.",
    )
    p.add_argument("--smoke", action="store_true", help="short run for `make test` (150 queries, <= 2 minutes)")
    p.add_argument("--queries", type=int, help=f"queries to submit (default {d.queries}; smoke 150)")
    p.add_argument("--duration", type=float, help=f"fault window in seconds (default {d.duration:g}; smoke 40)")
    p.add_argument("--workers", type=int, help=f"worker processes (default {d.workers})")
    p.add_argument("--concurrency", type=int, help=f"WORKER_CONCURRENCY (default {d.concurrency})")
    p.add_argument("--users", type=int, help=f"API users the load is spread over (default {d.users})")
    p.add_argument(
        "--child-kill-every",
        type=float,
        help=f"seconds between pool-child kills, 0 = none (default {d.child_kill_every:g})",
    )
    p.add_argument(
        "--worker-kill-every",
        type=float,
        help=f"seconds between whole-worker kills, 0 = none (default {d.worker_kill_every:g})",
    )
    p.add_argument(
        "--worker-kill-at", type=_floats, help="explicit worker-kill times, e.g. 8,30 (seconds into the window)"
    )
    p.add_argument(
        "--respawn-delay", type=float, help=f"seconds before a killed worker is restarted (default {d.respawn_delay:g})"
    )
    p.add_argument(
        "--broker",
        choices=("redis", "rabbitmq"),
        help="the broker under test (default redis). rabbitmq: a RabbitMQ node of the run's own "
        "(/usr/lib/rabbitmq/bin) is the broker, restarted with rabbitmqctl stop_app/start_app; Redis is not restarted",
    )
    p.add_argument(
        "--redis-restarts",
        type=int,
        help=f"broker restarts: Redis SHUTDOWN NOSAVE, or RabbitMQ stop_app/start_app (default {d.redis_restarts})",
    )
    p.add_argument("--redis-restart-at", type=_floats, help="explicit broker restart times")
    p.add_argument("--pg-restarts", type=int, help=f"PostgreSQL immediate restarts (default {d.pg_restarts})")
    p.add_argument("--pg-restart-at", type=_floats, help="explicit PostgreSQL restart times")
    p.add_argument("--down-min", type=float, help=f"shortest server downtime, s (default {d.down_min:g})")
    p.add_argument("--down-max", type=float, help=f"longest server downtime, s (default {d.down_max:g})")
    for kind in ("429", "500", "hang", "quota", "drop"):
        default = getattr(d, f"rate_{kind}")
        p.add_argument(
            f"--rate-{kind}", type=float, help=f"LLM {kind} fault rate during the window (default {default:g})"
        )
    p.add_argument("--latency-ms", type=float, help=f"simulated LLM latency (default {d.latency_ms:g})")
    p.add_argument("--llm-timeout-seconds", type=float, help=f"LLM_TIMEOUT_SECONDS (default {d.llm_timeout_seconds:g})")
    p.add_argument("--max-attempts", type=int, help=f"MAX_ATTEMPTS (default {d.max_attempts})")
    p.add_argument("--lease-seconds", type=float, help=f"LEASE_SECONDS (default {d.lease_seconds:g})")
    p.add_argument(
        "--sweep-interval-seconds", type=float, help=f"SWEEP_INTERVAL_SECONDS (default {d.sweep_interval_seconds:g})"
    )
    p.add_argument(
        "--stale-pending-seconds", type=float, help=f"STALE_PENDING_SECONDS (default {d.stale_pending_seconds:g})"
    )
    p.add_argument(
        "--env", type=_env_pair, action="append", default=[], metavar="KEY=VALUE", help="extra AIQ setting (repeatable)"
    )
    p.add_argument(
        "--drain-timeout", type=float, help=f"give up waiting after this many seconds (default {d.drain_timeout:g})"
    )
    p.add_argument("--drain-bound", type=float, help=f"drain time that still passes (default {d.drain_bound:g})")
    p.add_argument("--seed", type=int, help="seed for fault timing, targets and the simulator's random faults")
    p.add_argument(
        "--report", dest="report_path", metavar="REPORT", type=Path, help=f"JSON report path (default {d.report_path})"
    )
    p.add_argument("--keep-logs", type=Path, help="copy every process's log here at the end")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def config_from_args(args: argparse.Namespace) -> ChaosConfig:
    # Every option but --smoke, --env and --quiet is stored under the name of the ChaosConfig field it sets.
    given = vars(args)
    overrides: dict[str, Any] = {
        f.name: given[f.name] for f in dataclasses.fields(ChaosConfig) if given.get(f.name) is not None
    }
    if args.env:
        overrides["extra_env"] = dict(args.env)
    if args.quiet:
        overrides["verbose"] = False
    if args.worker_kill_every is not None and args.worker_kill_at is None and args.smoke:
        overrides["worker_kill_at"] = None
    return ChaosConfig.smoke(**overrides) if args.smoke else ChaosConfig(**overrides)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    if config.down_min > config.down_max:
        print("--down-min must not exceed --down-max", file=sys.stderr)
        return 2
    started = time.monotonic()
    run = ChaosRun(config)
    atexit.register(run.close)
    # SIGTERM (CI cancelling, pytest's teardown) unwinds like Ctrl-C, so every process is stopped.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Also when started from a shell that ignores SIGINT for background jobs: Ctrl-C / kill -INT must clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        report = asyncio.run(run.run())
    except KeyboardInterrupt:
        print("chaos: interrupted; stopping every process", file=sys.stderr)
        run.close()
        return 130
    except Exception as exc:  # noqa: BLE001 - the harness failed, not AIQ: say so with a distinct status
        print(f"chaos: harness error: {type(exc).__name__}: {exc}", file=sys.stderr)
        keep = config.keep_logs or Path(f"/tmp/aiq-chaos-logs-{run.run_id}")
        if config.keep_logs is None:  # close() copies to --keep-logs itself
            run.copy_logs(keep)
        print(f"chaos: logs copied to {keep}", file=sys.stderr)
        run.close()
        return 2
    if not report["ok"] and config.keep_logs is None:
        # Evidence for whoever reads the failure: the logs outlive the temp directory.
        keep = Path(f"/tmp/aiq-chaos-logs-{run.run_id}")
        run.copy_logs(keep)
        report["logs"]["kept_in"] = str(keep)
    elif config.keep_logs is not None:
        report["logs"]["kept_in"] = str(config.keep_logs)
    run.close()
    report["run"]["wall_seconds"] = round(time.monotonic() - started, 1)
    config.report_path.parent.mkdir(parents=True, exist_ok=True)
    config.report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(format_table(report))
    print(f"wall time {report['run']['wall_seconds']} s; JSON report: {config.report_path}")
    if "kept_in" in report["logs"]:
        print(f"logs: {report['logs']['kept_in']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
