"""The systems under test: the LLM simulator, AIQ and the textbook stack (P1), started and driven from outside."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from bench.plan import MODEL, PROMPT, USERS
from bench.stack import PY, SIM_API_KEY, CpuMeter, Servers, http_json, new_secret, pg, wait_http
from devkit.migrations import migrate
from devkit.paths import ROOT
from devkit.procs import Launcher, Proc, free_port


@dataclass(frozen=True)
class Layout:
    """The processes to start for a system and their extra environment, as the command line asks."""

    api_workers: int
    api_mode: str
    workers: int
    aiq_env: tuple[str, ...]
    api_env: tuple[str, ...]


class Simulator:
    """The LLM simulator (`python -m devkit.simulator`), its latency set between phases over HTTP."""

    def __init__(self, launcher: Launcher, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = launcher.start(
            "simulator",
            [
                PY,
                "-m",
                "devkit.simulator",
                "--port",
                str(self.port),
                "--latency-ms",
                "500",
                "--log-level",
                "warning",
                "--api-key",
                SIM_API_KEY,
            ],
            env,
        )
        wait_http(f"{self.url}/healthz", self.proc)

    def latency(self, ms: float) -> None:
        """Answer every call after `ms` milliseconds from now on."""
        http_json("POST", f"{self.url}/_sim/config", {"latency_ms": ms})

    def stats(self) -> dict[str, Any]:
        """Calls in flight now and at most since the last reset."""
        result: dict[str, Any] = http_json("GET", f"{self.url}/_sim/stats")
        return result

    def reset(self) -> None:
        """Zero the counters."""
        http_json("POST", f"{self.url}/_sim/reset", {})

    def wait_idle(self, timeout: float = 30) -> None:
        """Wait (up to `timeout`) until no call is in flight."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.stats()["in_flight"] > 0:
            time.sleep(0.2)


@dataclass
class System:
    """What the measurements need to know about AIQ or the reference stack."""

    name: str
    api_port: int
    api: list[Proc]
    workers: list[Proc]
    db_url: str
    table: str
    tokens: list[str]
    queue: str
    redis_url: str
    token_by_user: dict[str, str] = field(default_factory=dict)
    # Users whose submit limits an admin switched off (AIQ only): the baseline of the limits-cost measure.
    unlimited_tokens: list[str] = field(default_factory=list)

    def submit_spec(
        self, rate: float, duration: float | None = None, count: int | None = None, **kw: Any
    ) -> dict[str, Any]:
        """A loadgen spec of authenticated submits, for `duration` seconds or `count` requests."""
        body = json.dumps({"query": PROMPT, "model": MODEL})
        spec: dict[str, Any] = {
            "port": self.api_port,
            "requests": [
                {
                    "method": "POST",
                    "path": "/api/v1/query",
                    "headers": {"Authorization": f"Bearer {t}", "Content-Type": "application/json"},
                    "body": body,
                }
                for t in self.tokens
            ],
            "rate": rate,
            "max_connections": 256,
            "timeout_s": 5,  # past the step: a step that needs it has failed anyway
            "collect": "query_id",
            **kw,
        }
        if count is not None:
            spec["count"] = count
        else:
            spec["duration_s"] = duration
        return spec

    def poll_spec(self, rate: float, duration: float, ids_by_token: list[tuple[str, str]], **kw: Any) -> dict[str, Any]:
        """A loadgen spec of polls of existing rows, each with its owner's token."""
        return {
            "port": self.api_port,
            "requests": [
                {"method": "GET", "path": f"/api/v1/query/{qid}", "headers": {"Authorization": f"Bearer {tok}"}}
                for qid, tok in ids_by_token
            ],
            "rate": rate,
            "duration_s": duration,
            "max_connections": 256,
            "timeout_s": 5,
            **kw,
        }

    def meter(self, sim: Simulator) -> CpuMeter:
        """A CPU meter over this system's API and worker processes and the simulator."""
        return CpuMeter({"api": self.api, "worker": self.workers, "simulator": [sim.proc]})

    def purge(self) -> None:
        """Drop the backlog a rate step left behind: queue emptied, pending rows cancelled."""
        import redis

        client = redis.Redis.from_url(self.redis_url)
        client.delete(self.queue)
        client.close()
        with contextlib.closing(pg(self.db_url)) as conn, conn.cursor() as cur:
            cur.execute(f"UPDATE {self.table} SET status = 'cancelled', finished_at = now() WHERE status = 'pending'")

    def counts(self) -> tuple[int, int]:
        """Rows in the table, and how many of them are live (pending or running)."""
        with contextlib.closing(pg(self.db_url)) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT count(*), count(*) FILTER (WHERE status IN ('pending', 'running')) FROM {self.table}")
            rows, live = cur.fetchone()
            return int(rows), int(live)

    def settle(self, sim: Simulator, timeout: float = 30) -> float:
        """Purge until quiet: no live rows, no call in flight, and no row inserted for a second.

        After an overloaded step the API may still be working through accepted requests; they are
        let through and cancelled too, so the next step starts from an idle system.
        """
        t0 = time.monotonic()
        last, stable_since = -1, time.monotonic()
        while time.monotonic() - t0 < timeout:
            self.purge()
            rows, live = self.counts()
            if rows != last:
                last, stable_since = rows, time.monotonic()
            if live == 0 and sim.stats()["in_flight"] == 0 and time.monotonic() - stable_since >= 1.0:
                break
            time.sleep(0.25)
        return round(time.monotonic() - t0, 1)

    def ids_with_tokens(self, limit: int) -> list[tuple[str, str]]:
        """Existing rows paired with their owner's token (so every poll is a 200)."""
        with contextlib.closing(pg(self.db_url)) as conn, conn.cursor() as cur:
            cur.execute(
                f"SELECT id::text, user_id::text FROM {self.table} WHERE status = 'completed' "
                "ORDER BY created_at DESC LIMIT %s",
                (limit,),
            )
            rows = cur.fetchall()
        return [(qid, self.token_by_user[uid]) for qid, uid in rows if uid in self.token_by_user]

    def wait_terminal(self, ids: list[str], timeout: float) -> list[tuple[Any, ...]]:
        """The rows of `ids` once all are final (or as they are at the timeout), polled over one connection."""
        deadline = time.monotonic() + timeout
        rows: list[tuple[Any, ...]] = []
        with contextlib.closing(pg(self.db_url)) as conn, conn.cursor() as cur:
            while time.monotonic() < deadline:
                cur.execute(
                    f"SELECT status, created_at, finished_at, llm_latency_ms, started_at FROM {self.table} "
                    "WHERE id = ANY(%s::uuid[])",
                    (ids,),
                )
                rows = list(cur.fetchall())
                if len(rows) == len(ids) and all(r[0] in ("completed", "failed", "cancelled") for r in rows):
                    return rows
                time.sleep(0.25)
        return rows


def start_api(launcher: Launcher, name: str, app: str, env: dict[str, str], layout: Layout) -> tuple[int, list[Proc]]:
    """The API as `--api-workers` processes on one port.

    `reuseport` (default): one uvicorn per process (bench/serve.py), each on its own SO_REUSEPORT
    socket bound to the same port, so the kernel spreads connections evenly over the processes, as
    nginx's `reuseport` does. `workers`: `uvicorn --workers N`, where the processes share one
    listening socket; asyncio accepts connections in batches, so a burst of new keep-alive
    connections can all land on one process (measured: every one of them, in a 2-process run).
    """
    n = max(1, layout.api_workers)
    port = free_port()
    if layout.api_mode == "workers" or n == 1:
        # The Dockerfile's command; `--workers` only when asked for more than one process.
        cmd = [PY, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
        return port, [launcher.start(name, [*cmd, *(["--workers", str(n)] if n > 1 else [])], env)]
    procs = [launcher.start(f"{name}-{i}", [PY, "-m", "bench.serve", app, "--port", str(port)], env) for i in range(n)]
    return port, procs


def wait_api(port: int, path: str, procs: list[Proc], timeout: float = 60) -> None:
    """Ready when the port answers and every API process has finished its startup."""
    wait_http(f"http://127.0.0.1:{port}{path}", procs[0], timeout=timeout)
    deadline = time.monotonic() + timeout
    for proc in procs:
        while "startup complete" not in proc.log.read_text(errors="replace"):
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} did not start; see {proc.log}")
            time.sleep(0.1)


def aiq_api_env(layout: Layout, servers: Servers) -> dict[str, str]:
    """Extra environment for AIQ's API processes: the pool sizing below, then `--api-env`.

    Pool sizes for the API processes so that every pool fits under PostgreSQL's max_connections.

    Every AIQ process may open DB_POOL_SIZE + DB_MAX_OVERFLOW connections through SQLAlchemy plus
    DB_POOL_SIZE through its raw asyncpg pool: 10 + 5 + 10 = 25 at the defaults, so two API processes
    and one worker (75) fit under the default max_connections of 100 with room for this harness and
    psql. With more processes than that, the API processes get an equal share of what the workers
    (at their defaults) leave, without overflow; an overloaded API would otherwise answer 503
    "too many clients" before reaching any other limit.
    """
    from shared.config import Settings

    defaults = Settings.model_fields
    pool = int(defaults["db_pool_size"].default)
    per_process = 2 * pool + int(defaults["db_max_overflow"].default)
    limit = servers.max_connections() - 10
    budget = (limit - per_process * layout.workers) // max(1, layout.api_workers)
    pool_env = {} if per_process <= budget else {"DB_POOL_SIZE": str(max(2, budget // 2)), "DB_MAX_OVERFLOW": "0"}
    return {**pool_env, **dict(kv.split("=", 1) for kv in layout.api_env)}


def start_aiq(
    launcher: Launcher, servers: Servers, sim: Simulator, layout: Layout, api_extra_env: dict[str, str]
) -> System:
    """AIQ started as the Dockerfiles start it, on a migrated throwaway database, with its users logged in."""
    db_url = servers.new_database("aiq_bench")
    migrate(db_url)
    queue = f"aiq.bench.{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "ENVIRONMENT": "production",
        "DATABASE_URL": db_url,
        "REDIS_URL": servers.redis,
        "QUEUE_NAME": queue,
        "JWT_SECRET_KEY": new_secret(),
        "OPENAI_API_KEY": SIM_API_KEY,
        "OPENAI_BASE_URL": f"{sim.url}/v1",
        "ALLOWED_MODELS": MODEL,
        "DEFAULT_MODEL": MODEL,
        # Setup only: register/login a handful of users quickly. Never on the measured paths.
        "BCRYPT_ROUNDS": "4",
        "ACCESS_TOKEN_TTL_SECONDS": "7200",
        "WORKER_METRICS_PORT": str(free_port()),
        # Its own port, shared by this run's API processes (SO_REUSEPORT), never another stack's default.
        "API_METRICS_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
        # Limits on, but far above any load here: every submit pays for the check and none is refused.
        "LIMIT_REQUESTS_PER_MINUTE": str(10**9),
        "LIMIT_MAX_PENDING": str(10**9),
        "LIMIT_TOKEN_BUDGET": str(10**15),
        # Setup registers its users from one address; repeated runs within the hour must not be throttled.
        "REGISTER_PER_HOUR": "0",
        # The SSE measure holds thousands of streams for a handful of users.
        "MAX_STREAMS_PER_USER": "0",
    }
    for key in ("PROMETHEUS_MULTIPROC_DIR", "WORKER_CONCURRENCY", "LOG_LEVEL", "DB_POOL_SIZE", "DB_MAX_OVERFLOW"):
        env.pop(key, None)
    # The webhook-lag measure's HTTPS receiver: reachable on loopback, its certificate trusted.
    from bench.measures.webhooks import receiver_env

    env.update(receiver_env())
    env.update(dict(kv.split("=", 1) for kv in layout.aiq_env))
    port, api = start_api(launcher, "aiq-api", "api.main:app", {**env, **api_extra_env}, layout)
    workers = []
    for i in range(layout.workers):
        wenv = {**env, "WORKER_METRICS_PORT": str(free_port()) if i else env["WORKER_METRICS_PORT"]}
        workers.append(
            launcher.start(
                f"aiq-worker-{i}",
                [PY, "-m", "celery", "-A", "worker.celery_app", "worker", "--hostname", f"bench{i}-{port}@%h"],
                wenv,
            )
        )
    wait_api(port, "/readyz", api)
    wait_http(f"http://127.0.0.1:{env['WORKER_METRICS_PORT']}/healthz", workers[0], timeout=90)
    base = f"http://127.0.0.1:{port}/api/v1"
    by_user = {uid: tok for uid, tok in (_new_user(base) for _ in range(USERS))}
    unlimited = dict(_new_user(base) for _ in range(USERS))
    # An admin's override of 0 switches all three limits off for these users (as PUT .../limits would).
    with contextlib.closing(pg(db_url)) as conn, conn.cursor() as cur:
        for uid in unlimited:
            cur.execute(
                "INSERT INTO user_limits (user_id, requests_per_minute, max_pending, token_budget)"
                " VALUES (%s, 0, 0, 0)",
                (uid,),
            )
    tokens = list(by_user.values())
    return System(
        "aiq", port, api, workers, db_url, "queries", tokens, queue, servers.redis, by_user, list(unlimited.values())
    )


def _new_user(base: str) -> tuple[str, str]:
    """Register and log in a fresh user; their id and access token."""
    email = f"bench-{uuid.uuid4().hex[:10]}@example.com"
    password = "bench password 0123456789"  # noqa: S105
    http_json("POST", f"{base}/auth/register", {"email": email, "password": password})
    tok = http_json("POST", f"{base}/auth/login", {"email": email, "password": password})["access_token"]
    me = http_json("GET", f"{base}/users/me", headers={"Authorization": f"Bearer {tok}"})
    return me["id"], tok


def start_naive(launcher: Launcher, servers: Servers, sim: Simulator, layout: Layout) -> System:
    """The textbook stack (bench/naive) on its own database and queue, with tokens for its users."""
    import jwt

    from shared.config import Settings

    db_url = servers.new_database("naive_bench")
    settings = Settings(database_url=db_url, redis_url=servers.redis)
    queue = f"naive.bench.{uuid.uuid4().hex[:8]}"
    secret = new_secret()
    env = {
        **os.environ,
        "NAIVE_DATABASE_URL": settings.sync_database_url,
        "NAIVE_BROKER_URL": settings.broker_url,
        "NAIVE_RESULT_BACKEND": settings.broker_url,
        "NAIVE_QUEUE": queue,
        "NAIVE_JWT_SECRET": secret,
        "NAIVE_MODEL": MODEL,
        "OPENAI_API_KEY": SIM_API_KEY,
        "OPENAI_BASE_URL": f"{sim.url}/v1",
        "PYTHONUNBUFFERED": "1",
    }
    subprocess.run(
        [PY, "-c", "from bench.naive.db import create_schema; create_schema()"], cwd=ROOT, env=env, check=True
    )
    port, api = start_api(launcher, "naive-api", "bench.naive.app:app", env, layout)
    worker = launcher.start(
        "naive-worker",
        [
            PY,
            "-m",
            "celery",
            "-A",
            "bench.naive.tasks",
            "worker",
            "--loglevel",
            "INFO",
            "--hostname",
            f"naive-{port}@%h",
        ],
        env,
    )
    wait_api(port, "/healthz", api)
    # Ready when the pool children exist (prefork starts `concurrency` of them).
    deadline = time.monotonic() + 60
    while len(worker.child_pids()) < (os.cpu_count() or 1) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    tokens, by_user = [], {}
    for _ in range(USERS):
        uid = str(uuid.uuid4())
        tok = jwt.encode({"sub": uid, "exp": int(time.time()) + 7200}, secret, algorithm="HS256")
        tokens.append(tok)
        by_user[uid] = tok
    return System("naive", port, api, [worker], db_url, "naive_queries", tokens, queue, servers.redis, by_user)
