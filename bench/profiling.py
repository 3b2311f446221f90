"""Where the CPU goes: py-spy on the API and the worker under load, and summaries of its collapsed stacks."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from bench.context import RunContext
from bench.plan import say
from bench.stack import PY
from bench.systems import System
from devkit.paths import ROOT


def py_spy() -> str | None:
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    return spy if Path(spy).exists() else None


# Samples per second of every recording: a sample stands for 1/SAMPLE_HZ s of CPU (`--gil`: of Python on CPU).
SAMPLE_HZ = 200
# Each recording's py-spy process and its output file, by target name.
Recordings = dict[str, tuple[subprocess.Popen[bytes], Path]]


def record(spy: str, targets: dict[str, int], seconds: float, outdir: Path, tag: str) -> Recordings:
    """Start py-spy on each pid: sampling, non-blocking, only threads holding the GIL (= Python on CPU)."""
    started: Recordings = {}
    for name, pid in targets.items():
        raw = outdir / f"profile-{tag}-{name}.txt"
        started[name] = (
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(seconds)),
                    "--rate",
                    str(SAMPLE_HZ),
                    "--nonblocking",
                    "--gil",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            raw,
        )
    return started


def collect(started: Recordings, seconds: float) -> dict[str, Any]:
    """Wait for each recording to end and summarize what it wrote."""
    out = {}
    for name, (p, raw) in started.items():
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(seconds + 20)
        if raw.exists():
            out[name] = summarize_profile(raw, steps=WORKER_STEPS if name.startswith("worker") else ())
            out[name]["file"] = str(raw.relative_to(ROOT)) if raw.is_relative_to(ROOT) else str(raw)
    return out


def profile(ctx: RunContext, system: System, rate: float) -> dict[str, Any]:
    """Where the CPU goes: py-spy on the API processes under submit load, then on the worker during a burst."""
    spy = py_spy()
    if spy is None:
        say("py-spy not installed (pip install py-spy): skipping the profile")
        return {}
    ctx.sim.latency(500)
    system.settle(ctx.sim)
    api_pids = [pid for proc in system.api for pid in ([p for p in proc.child_pids() if _is_server(p)] or [proc.pid])]
    seconds = 8
    say(f"profile: py-spy on {len(api_pids)} API process(es) and the worker, submits at {rate:.0f}/s for {seconds} s")
    targets = {f"api{i}": pid for i, pid in enumerate(api_pids)}
    targets.update({f"worker{i}": w.pid for i, w in enumerate(system.workers)})
    started = record(spy, targets, seconds, ctx.logdir, f"{system.name}-submit")
    time.sleep(0.5)
    r = ctx.lg.run(system.submit_spec(rate, duration=seconds - 1, warmup_s=0), system.meter(ctx.sim))
    out: dict[str, Any] = {
        "submit": {
            "rate": rate,
            "p99_ms": r["latency_ms"]["p99"],
            "cpu": r.get("cpu"),
            "processes": collect(started, seconds),
        }
    }
    system.settle(ctx.sim)
    n = 1500
    say(f"profile: py-spy on the worker during a burst of {n} at 0.5 s")
    started = record(
        spy, {f"worker{i}": w.pid for i, w in enumerate(system.workers)}, seconds, ctx.logdir, f"{system.name}-burst"
    )
    ctx.lg.run(system.submit_spec(0, count=n, max_connections=64, timeout_s=120))
    out["burst"] = {"count": n, "processes": collect(started, seconds)}
    system.settle(ctx.sim, timeout=60)
    return out


def _is_server(pid: int) -> bool:
    # uvicorn --workers N also runs multiprocessing's resource tracker; it serves nothing.
    with contextlib.suppress(psutil.Error):
        p = psutil.Process(pid)
        return "python" in p.name() and "resource_tracker" not in " ".join(p.cmdline())
    return False


def summarize_profile(path: Path, top: int = 25, steps: tuple[tuple[str, tuple[str, ...]], ...] = ()) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks; with `steps`, the samples
    of each step too (`by_step_samples`: a sample goes to the first step any of whose needles is in its stack)."""
    self_: dict[str, int] = {}
    incl: dict[str, int] = {}
    pkg: dict[str, int] = {}
    by_step: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf = frames[-1]
        self_[leaf] = self_.get(leaf, 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
        area = _area(frames)
        pkg[area] = pkg.get(area, 0) + n
        if steps:
            step = next((name for name, needles in steps if any(x in stack for x in needles)), "the loop and the rest")
            by_step[step] = by_step.get(step, 0) + n

    def rank(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    out = {"samples": total, "self_pct": rank(self_), "inclusive_pct": rank(incl), "by_area_pct": rank(pkg)}
    if steps:
        out["by_step_samples"] = dict(sorted(by_step.items(), key=lambda kv: -kv[1]))
    return out


# The worker's work for one answer, step by step, as py-spy names its frames. A sample resumed inside a coroutine
# shows only that coroutine's frames, so a step is told by its own functions and the libraries only it uses.
WORKER_STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # The consumer thread: kombu's BRPOP reads, Celery's strategy, the hand-off to the loop.
    ("Celery's consumer", ("_run_module_as_main (<frozen runpy>",)),
    ("the SDK call", ("(shared/llm.py", "(openai/", "(httpx2/", "(aiohttp/")),
    ("upstream budget", ("(shared/upstream.py",)),
    ("the end's batch", ("_end (worker/processing.py", "(shared/scriptbatch.py")),
    ("events and deltas", ("(worker/streaming.py", "(shared/events.py")),
    ("PostgreSQL", ("_run_autocommitted (worker/processing.py", "(asyncpg/")),
    ("Celery's trace", ("(celery/", "(worker/celery_app.py", "(worker/pool.py", "(greenlet")),
    ("redis-py", ("(redis/",)),
    ("logging", ("(logging/", "(shared/logging.py")),
    ("metrics", ("(prometheus_client/",)),
)


def ms_per_answer(samples: dict[str, int], answers: int) -> dict[str, float]:
    """Sample counts as CPU-ms per answer."""
    return {k: round(v * 1000 / SAMPLE_HZ / max(1, answers), 2) for k, v in samples.items()}


# py-spy frames read "function (package/module.py:line)"; the innermost frame that matches names the area.
_AREAS = (
    ("(uvicorn/", "uvicorn"),
    ("(httptools", "uvicorn"),
    ("(shared/logging", "logging"),
    ("(logging/", "logging"),
    ("(json/", "json"),
    ("(orjson", "json"),
    ("(kombu/", "kombu"),
    ("(celery/", "celery"),
    ("(billiard/", "celery"),
    ("(redis/", "redis-py"),
    ("(asyncpg/", "asyncpg"),
    ("(sqlalchemy/orm", "sqlalchemy orm"),
    ("(sqlalchemy/", "sqlalchemy core"),
    ("(jwt/", "jwt"),
    ("(pydantic", "pydantic"),
    ("(fastapi/", "fastapi"),
    ("(starlette/", "starlette"),
    ("(anyio/", "anyio"),
    ("(openai/", "openai sdk"),
    ("(httpx", "httpx"),
    ("(httpcore", "httpx"),
    ("(h11/", "httpx"),
    ("(aiohttp/", "aiohttp"),
    ("(prometheus_client/", "prometheus"),
    ("(concurrent/futures", "threads"),
    ("(threading.py", "threads"),
    ("(queue.py", "threads"),
    ("(asyncio/", "asyncio"),
    ("(selectors.py", "asyncio"),
    ("(uvloop", "asyncio"),
    ("(typing.py", "typing"),
    ("(api/", "aiq code"),
    ("(shared/", "aiq code"),
    ("(worker/", "aiq code"),
    ("(bench/", "aiq code"),
)


def _area(frames: list[str]) -> str:
    for frame in reversed(frames):
        for needle, name in _AREAS:
            if needle in frame:
                return name
    return "other"
