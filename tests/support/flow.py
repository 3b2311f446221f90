"""A stack of its own for the flow-control tests: a strict (rate-limited) simulator, an API, several workers.

Its own database (the session stack's sweeper must not re-send these rows to its unlimited simulator) and its
own queue name; the Redis keys of that queue are deleted at the end.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from devkit.procs import Launcher, free_port
from shared.config import Settings
from tests.support.db import throwaway_database
from tests.support.polling import wait_for_http
from tests.support.stack import stack_settings


@dataclass
class LimitedStack:
    api_url: str
    sim_url: str
    settings: Settings
    db: Engine
    redis_url: str
    logs: list[Path] = field(default_factory=list)

    def sim_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.sim_url}/_sim/stats", timeout=10).json()
        return stats

    def budget_keys(self) -> list[bytes]:
        client = redis.Redis.from_url(self.redis_url)
        try:
            return list(client.scan_iter(f"aiq:{self.settings.queue_name}:up:*"))
        finally:
            client.close()

    def wipe_budget(self) -> int:
        """What a Redis restart does to the budget (FLUSHDB is not allowed on the shared Redis)."""
        keys = self.budget_keys()
        client = redis.Redis.from_url(self.redis_url)
        try:
            return int(client.delete(*keys)) if keys else 0
        finally:
            client.close()

    def rows(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        with self.db.connect() as conn:
            result = conn.execute(
                text(
                    "SELECT id::text AS id, status, attempts, priority, created_at, started_at, finished_at, "
                    "error_code FROM queries WHERE id::text = ANY(:ids)"
                ),
                {"ids": list(ids)},
            )
            return [dict(r) for r in result.mappings()]

    def wait_all_terminal(self, ids: Sequence[str], timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows(ids)
            if all(r["status"] in ("completed", "failed", "cancelled") for r in rows):
                return rows
            if time.monotonic() > deadline:
                states: dict[str, int] = {}
                for r in rows:
                    states[r["status"]] = states.get(r["status"], 0) + 1
                raise AssertionError(f"not all terminal after {timeout}s: {states}")
            time.sleep(0.5)


def submit_many(api_url: str, headers: dict[str, str], prompts: Sequence[str], **extra: Any) -> list[str]:
    """Submit through the API (a few threads at once, like a client's burst); returns the ids in order."""

    def one(client: httpx.Client, prompt: str) -> str:
        r = client.post("/api/v1/query", json={"query": prompt, **extra}, headers=headers)
        assert r.status_code == 202, r.text
        query_id: str = r.json()["query_id"]
        return query_id

    with httpx.Client(base_url=api_url, timeout=30) as client, ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda p: one(client, p), prompts))


@contextmanager
def limited_stack(
    server_urls: dict[str, str],
    root: Path,
    *,
    sim_args: Sequence[str],
    env: dict[str, str],
    workers: int = 2,
) -> Iterator[LimitedStack]:
    """Simulator with `sim_args` (e.g. `--limit-rpm 240`), an API and `workers` worker processes.

    A test that calls it takes the `stack_turn` fixture (tests/conftest.py).
    """
    root.mkdir(parents=True, exist_ok=True)
    with throwaway_database(server_urls["database"]) as database_url:
        sim_port = free_port()
        sim_url = f"http://127.0.0.1:{sim_port}"
        values = {**stack_settings(database_url, server_urls["redis"], sim_url), **env}
        base_env = {k: v for k, v in __import__("os").environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        launcher = Launcher(root)
        engine = create_engine(Settings(database_url=database_url).sync_database_url)
        logs = [root / "simulator.log", root / "api.log"]
        try:
            sim = launcher.start(
                "simulator",
                [
                    sys.executable,
                    "-m",
                    "devkit.simulator",
                    "--port",
                    str(sim_port),
                    "--api-key",
                    values["OPENAI_API_KEY"],
                    "--log-level",
                    "warning",
                    *sim_args,
                ],
                base_env,
            )
            api_port = free_port()
            api = launcher.start(
                "api",
                [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(api_port)],
                {**base_env, **values},
            )
            # Every process starts at once and is waited for after: their imports overlap instead of queueing.
            ready: list[tuple[str, subprocess.Popen[bytes]]] = [(f"{sim_url}/healthz", sim.popen)]
            for n in range(workers):
                port = str(free_port())
                proc = launcher.start(
                    f"worker{n}",
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "worker.celery_app",
                        "worker",
                        "--hostname",
                        f"flow{n}-{port}@%h",
                    ],
                    {**base_env, **values, "WORKER_METRICS_PORT": port},
                )
                logs.append(root / f"worker{n}.log")
                ready.append((f"http://127.0.0.1:{port}/healthz", proc.popen))
            api_url = f"http://127.0.0.1:{api_port}"
            ready.append((f"{api_url}/readyz", api.popen))
            for url, popen in ready:
                wait_for_http(url, timeout=60, proc=popen)
            settings = Settings(**{k.lower(): v for k, v in values.items()})  # type: ignore[arg-type]
            stack = LimitedStack(api_url, sim_url, settings, engine, server_urls["redis"], logs)
            yield stack
            stack.wipe_budget()
        finally:
            launcher.stop_all(timeout=20)
            engine.dispose()
