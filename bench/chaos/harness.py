"""The chaos experiment: a real AIQ stack on the harness's own servers, load, faults, drain, report.

Everything runs on 127.0.0.1 with free ports: a PostgreSQL cluster and a Redis server of our own (so they
can be restarted), with `--broker rabbitmq` also a RabbitMQ node of our own as the broker, the LLM simulator,
one uvicorn API and several Celery workers as separate processes.
`ChaosRun.run()` returns the report (see bench/chaos/report.py and docs/chaos.md); `close()` stops
everything and is safe to call more than once, from `finally`, atexit or a signal handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.chaos import audit, report
from bench.chaos._watchdog import Reaper
from bench.chaos.services import OwnPostgres, OwnRabbit, OwnRedis
from devkit import embedded
from devkit.migrations import migrate
from devkit.paths import ROOT
from devkit.procs import Launcher, Proc, free_port

SIM_API_KEY = "sk-chaos-sim-key-0123456789"
MODEL = "sim-small"
PASSWORD = "chaos harness password 0123"  # noqa: S105 - users of a throwaway stack
DB_NAME = "aiq_chaos"
# A submission is retried with the same Idempotency-Key after a connection error, a timeout or a 5xx,
# so a restart of PostgreSQL or Redis does not have to turn into a rejected query.
SUBMIT_RETRY_DELAYS = (0.5, 1.0, 2.0, 3.0, 4.0)
SUBMIT_TIMEOUT_SECONDS = 10.0
# Variables of the calling shell that must not leak into the stack under test.
STRIPPED_ENV = (
    "DATABASE_URL",
    "REDIS_URL",
    "BROKER_URL",
    "CELERY_BROKER_URL",
    "TEST_AMQP_URL",
    "TEST_DATABASE_URL",
    "TEST_REDIS_URL",
    "PROMETHEUS_MULTIPROC_DIR",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "QUEUE_NAME",
    "WORKER_METRICS_PORT",
    "API_METRICS_PORT",
)


@dataclass
class ChaosConfig:
    """One experiment. Defaults are the full run of the issue; `smoke()` is the short one for `make test`."""

    mode: str = "full"
    # redis: Redis is the broker and is restarted without persistence. rabbitmq: a RabbitMQ node of the run's
    # own is the broker and is restarted (stop_app / start_app) instead; Redis (limits) is left alone.
    broker: str = "redis"
    queries: int = 2000
    duration: float = 300.0  # the fault window, seconds; submissions are spread evenly over it
    workers: int = 3
    concurrency: int = 200
    users: int = 5
    # Kills. "Child" kills hit a pool child when the worker has one, else the whole worker.
    child_kill_every: float = 15.0
    child_kill_phase: float = 10.0
    worker_kill_every: float = 90.0
    worker_kill_phase: float = 50.0
    worker_kill_at: list[float] | None = None  # explicit times override every/phase
    respawn_delay: float = 2.0  # a supervisor brings a killed worker back after this long
    # Restarts: evenly placed in the window unless explicit times are given. They restart the broker:
    # Redis, or RabbitMQ with `broker="rabbitmq"`.
    redis_restarts: int = 2
    redis_restart_at: list[float] | None = None
    pg_restarts: int = 2
    pg_restart_at: list[float] | None = None
    down_min: float = 2.0
    down_max: float = 5.0
    # LLM faults during the window (the simulator's live config); zero after it.
    rate_429: float = 0.10
    rate_500: float = 0.05
    rate_hang: float = 0.03
    rate_quota: float = 0.01
    rate_drop: float = 0.0
    retry_after_min: float = 1.0
    retry_after_max: float = 5.0
    latency_ms: float = 800.0
    latency_jitter_ms: float = 600.0
    # AIQ settings (environment of API and workers).
    llm_timeout_seconds: float = 5.0
    max_attempts: int = 8
    retry_base_seconds: float = 0.5
    retry_max_seconds: float = 5.0
    lease_seconds: float = 15.0
    heartbeat_seconds: float = 3.0
    sweep_interval_seconds: float = 5.0
    stale_pending_seconds: float = 15.0
    shutdown_grace_seconds: float = 10.0
    extra_env: dict[str, str] = field(default_factory=dict)
    # After the window.
    drain_timeout: float = 180.0
    drain_bound: float = 120.0
    seed: int = field(default_factory=lambda: random.SystemRandom().randrange(1, 2**31))
    report_path: Path = ROOT / "bench" / "chaos" / "results" / "latest.json"
    keep_logs: Path | None = None
    verbose: bool = True

    @classmethod
    def smoke(cls, **overrides: Any) -> ChaosConfig:
        """150 queries in 40 s: one worker kill, one Redis and one PostgreSQL restart, every LLM fault kind."""
        values: dict[str, Any] = {
            "mode": "smoke",
            "queries": 150,
            "duration": 40.0,
            "child_kill_every": 0.0,
            "worker_kill_at": [8.0],
            "redis_restarts": 1,
            "pg_restarts": 1,
            "drain_timeout": 60.0,
            "drain_bound": 60.0,
        }
        values.update(overrides)
        return cls(**values)

    def schedule(self) -> list[tuple[float, str]]:
        """(seconds after the window opens, fault kind), sorted; all strictly inside the window."""
        d = self.duration
        events: list[tuple[float, str]] = []
        if self.child_kill_every > 0:
            t = self.child_kill_phase
            while t < d:
                events.append((t, "child_kill"))
                t += self.child_kill_every
        if self.worker_kill_at is not None:
            events += [(t, "worker_kill") for t in self.worker_kill_at if t < d]
        elif self.worker_kill_every > 0:
            t = self.worker_kill_phase
            while t < d:
                events.append((t, "worker_kill"))
                t += self.worker_kill_every
        broker_restart = "rabbitmq_restart" if self.broker == "rabbitmq" else "redis_restart"
        events += [(t, broker_restart) for t in _spread(self.redis_restarts, self.redis_restart_at, d, 0.3, 0.7, 0.4)]
        events += [(t, "pg_restart") for t in _spread(self.pg_restarts, self.pg_restart_at, d, 0.5, 0.85, 0.65)]
        return sorted(events)

    def aiq_env(self) -> dict[str, str]:
        """AIQ settings for API and workers (database, broker and ports are added by the stack)."""
        env = {
            "ENVIRONMENT": "test",
            "JWT_SECRET_KEY": secrets.token_urlsafe(48),
            "OPENAI_API_KEY": SIM_API_KEY,
            "ALLOWED_MODELS": MODEL,
            "DEFAULT_MODEL": MODEL,
            "MAX_QUERY_CHARS": "2000",
            "BCRYPT_ROUNDS": "4",
            "ACCESS_TOKEN_TTL_SECONDS": "7200",
            "LOG_LEVEL": "INFO",
            "WORKER_CONCURRENCY": str(self.concurrency),
            "LLM_TIMEOUT_SECONDS": str(self.llm_timeout_seconds),
            "MAX_ATTEMPTS": str(self.max_attempts),
            "RETRY_BASE_SECONDS": str(self.retry_base_seconds),
            "RETRY_MAX_SECONDS": str(self.retry_max_seconds),
            "LEASE_SECONDS": str(self.lease_seconds),
            "HEARTBEAT_SECONDS": str(self.heartbeat_seconds),
            "SWEEP_INTERVAL_SECONDS": str(self.sweep_interval_seconds),
            "STALE_PENDING_SECONDS": str(self.stale_pending_seconds),
            "SHUTDOWN_GRACE_SECONDS": str(self.shutdown_grace_seconds),
            # Nothing here scrapes the API; its metrics port would clash between stacks on one host.
            "API_METRICS_PORT": "0",
            # Limits on (the settle path runs under the faults too) but above this load; the harness's users
            # register from one address.
            "LIMIT_REQUESTS_PER_MINUTE": str(10**9),
            "LIMIT_MAX_PENDING": str(10**9),
            "LIMIT_TOKEN_BUDGET": str(10**15),
            "REGISTER_PER_HOUR": "0",
            "PYTHONUNBUFFERED": "1",
        }
        env.update(self.extra_env)
        return env

    def fault_rates(self) -> dict[str, float]:
        return {
            "rate_429": self.rate_429,
            "rate_500": self.rate_500,
            "rate_hang": self.rate_hang,
            "rate_quota": self.rate_quota,
            "rate_drop": self.rate_drop,
        }

    def public(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["report_path"] = str(self.report_path)
        data["keep_logs"] = str(self.keep_logs) if self.keep_logs else None
        data["schedule"] = [{"t": t, "kind": k} for t, k in self.schedule()]
        return data


def _spread(n: int, explicit: list[float] | None, d: float, first: float, last: float, single: float) -> list[float]:
    if explicit is not None:
        return [t for t in explicit if t < d]
    if n <= 0:
        return []
    if n == 1:
        return [round(d * single, 2)]
    return [round(d * (first + (last - first) * k / (n - 1)), 2) for k in range(n)]


@dataclass
class WorkerSlot:
    """One supervised worker position; the process in it changes at every (re)start."""

    index: int
    proc: Proc | None = None
    generation: int = 0
    metrics_port: int = 0
    respawning: bool = False


@dataclass(frozen=True)
class KillRecord:
    """A process the harness SIGKILLed: claims it made between start and kill died with it."""

    pid: int
    started_at: float
    killed_at: float


@dataclass
class Submission:
    seq: int
    key: str
    query_id: str | None = None
    http_attempts: int = 0
    replayed: bool = False
    errors: list[str] = field(default_factory=list)


class HarnessError(RuntimeError):
    """The harness itself could not set the experiment up."""


class ChaosRun:
    """Owns every process of one experiment."""

    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.run_id = uuid.uuid4().hex[:8]
        self.reaper = Reaper()
        # Short on purpose: PostgreSQL's socket path must stay under ~100 characters.
        self.base = Path(tempfile.mkdtemp(prefix="aiqc-", dir="/tmp"))
        self.reaper.add_tree(self.base)
        self.logs = self.base / "logs"
        self.logs.mkdir()
        self.launcher = Launcher(self.logs)
        self.pg: OwnPostgres | None = None
        self.redis: OwnRedis | None = None
        self.rabbit: OwnRabbit | None = None
        self.sim: Proc | None = None
        self.api: Proc | None = None
        self.slots: list[WorkerSlot] = []
        self.env: dict[str, str] = {}
        self.api_url = ""
        self.sim_url = ""
        self.queue_name = f"aiq.chaos.{self.run_id}"
        self.database_url = ""
        self.t0 = 0.0  # wall clock when the fault window opened
        self.events: list[dict[str, Any]] = []
        self.kills: list[KillRecord] = []
        self.counters: Counter[str] = Counter()
        self.timeline: list[dict[str, Any]] = []
        self.submissions: list[Submission] = []
        self.users: list[dict[str, str]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._respawns: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.code_digest_start = ""
        self.code_digest_end = ""
        self._stopping = False

    # ------------------------------------------------------------------ output

    def say(self, message: str) -> None:
        if self.config.verbose:
            rel = f"t={time.time() - self.t0:7.1f}s" if self.t0 else "setup    "
            print(f"[chaos {rel}] {message}", file=sys.stderr, flush=True)

    def event(self, kind: str, **detail: Any) -> dict[str, Any]:
        entry = {"t": round(time.time() - self.t0, 2) if self.t0 else None, "at": round(time.time(), 3), "kind": kind}
        entry.update(detail)
        self.events.append(entry)
        self.counters[kind] += 1
        self.say(f"{kind} {' '.join(f'{k}={v}' for k, v in detail.items())}")
        return entry

    # ------------------------------------------------------------------ setup

    def _start_servers(self) -> None:
        self.pg = OwnPostgres(self.base, self.reaper)
        self.pg.init()
        self.pg.start()
        self.redis = OwnRedis(self.base)
        self.redis.start()
        if self.config.broker == "rabbitmq":
            self.rabbit = OwnRabbit(self.base)
            self.rabbit.start()
        self.database_url = embedded.create_database(self.pg.url, DB_NAME)
        migrate(self.database_url)
        audit.install(self.database_url)

    def _base_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV and not k.startswith("SIM_")}

    def _start_simulator(self) -> None:
        c = self.config
        port = free_port()
        argv = [
            sys.executable, "-m", "devkit.simulator",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--latency-ms", str(c.latency_ms),
            "--latency-jitter-ms", str(c.latency_jitter_ms),
            "--api-key", SIM_API_KEY,
            "--retry-after-min", str(c.retry_after_min),
            "--retry-after-max", str(c.retry_after_max),
            "--hang-seconds", str(max(60.0, c.llm_timeout_seconds * 4)),
            "--seed", str(c.seed),
            "--log-level", "warning",
        ]  # fmt: skip
        self.sim = self.launcher.start("simulator", argv, self._base_env())
        self.sim_url = f"http://127.0.0.1:{port}"

    def _start_api(self, port: int | None = None) -> None:
        port = port or free_port()
        argv = [
            sys.executable, "-m", "uvicorn", "api.main:app",
            "--host", "127.0.0.1", "--port", str(port),
            "--timeout-graceful-shutdown", "5",
        ]  # fmt: skip
        if self.api is not None:
            self.launcher.forget(self.api)
        self.api = self.launcher.start("api", argv, self.env)
        self.api_url = f"http://127.0.0.1:{port}"

    def _start_worker(self, slot: WorkerSlot) -> None:
        slot.generation += 1
        slot.metrics_port = free_port()
        env = {**self.env, "WORKER_METRICS_PORT": str(slot.metrics_port)}
        argv = [
            sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
            "--hostname", f"chaos{slot.index}g{slot.generation}@%h",
        ]  # fmt: skip
        if slot.proc is not None:
            self.launcher.forget(slot.proc)
        slot.proc = self.launcher.start(f"worker-{slot.index}", argv, env)

    async def _wait_http(self, url: str, proc: Proc | None, within: float) -> None:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                if proc is not None and not proc.alive():
                    raise HarnessError(f"{proc.name} exited during startup; see {proc.log}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise HarnessError(f"{url} not ready after {within}s")

    async def setup(self) -> None:
        c = self.config
        started = time.monotonic()
        self.code_digest_start = code_digest()
        servers = "PostgreSQL, Redis and RabbitMQ" if c.broker == "rabbitmq" else "PostgreSQL and Redis"
        self.say(f"run {self.run_id} seed {c.seed}: starting {servers} in {self.base}")
        await asyncio.to_thread(self._start_servers)
        assert self.pg is not None
        assert self.redis is not None
        self._start_simulator()
        self.env = {
            **self._base_env(),
            **c.aiq_env(),
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis.url,
            **({"BROKER_URL": self.rabbit.url} if self.rabbit is not None else {}),
            "QUEUE_NAME": self.queue_name,
            "OPENAI_BASE_URL": f"{self.sim_url}/v1",
        }
        self._start_api()
        self.slots = [WorkerSlot(index=i) for i in range(c.workers)]
        for slot in self.slots:
            self._start_worker(slot)
        await self._wait_http(f"{self.sim_url}/healthz", self.sim, 30)
        await self._wait_http(f"{self.api_url}/readyz", self.api, 60)
        await asyncio.gather(
            *(self._wait_http(f"http://127.0.0.1:{s.metrics_port}/healthz", s.proc, 90) for s in self.slots)
        )
        await self._sim_config(dict.fromkeys(c.fault_rates(), 0.0))
        await self._register_users()
        self.say(
            f"stack up in {time.monotonic() - started:.1f}s: PostgreSQL :{self.pg.port}, Redis :{self.redis.port}, "
            f"{f'RabbitMQ :{self.rabbit.port} (broker), ' if self.rabbit else ''}"
            f"API {self.api_url}, simulator {self.sim_url}, {c.workers} workers x {c.concurrency}"
        )

    async def _register_users(self) -> None:
        async with httpx.AsyncClient(base_url=self.api_url, timeout=15) as client:
            for i in range(self.config.users):
                email = f"chaos-{self.run_id}-{i}@example.com"
                r = await client.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD})
                if r.status_code != 201:
                    raise HarnessError(f"register failed: {r.status_code} {r.text}")
                r = await client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
                if r.status_code != 200:
                    raise HarnessError(f"login failed: {r.status_code} {r.text}")
                self.users.append({"email": email, "token": r.json()["access_token"]})

    async def _sim_config(self, values: dict[str, float]) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.post(f"{self.sim_url}/_sim/config", json=values)
            r.raise_for_status()

    # ------------------------------------------------------------------ load

    async def _submit_all(self, client: httpx.AsyncClient) -> None:
        c = self.config
        interval = c.duration / max(1, c.queries)
        tasks = []
        for seq in range(c.queries):
            delay = self.t0 + seq * interval - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sub = Submission(seq=seq, key=f"chaos-{self.run_id}-{seq}")
            self.submissions.append(sub)
            tasks.append(asyncio.create_task(self._submit_one(client, sub)))
        await asyncio.gather(*tasks)

    async def _submit_one(self, client: httpx.AsyncClient, sub: Submission) -> None:
        user = self.users[sub.seq % len(self.users)]
        body = {
            "query": f"Chaos run {self.run_id}, query {sub.seq}: explain the number {sub.seq} in one sentence.",
            "metadata": {"chaos_run": self.run_id, "seq": sub.seq},
        }
        headers = {"Authorization": f"Bearer {user['token']}", "Idempotency-Key": sub.key}
        for attempt in range(len(SUBMIT_RETRY_DELAYS) + 1):
            sub.http_attempts += 1
            try:
                r = await client.post("/api/v1/query", json=body, headers=headers)
            except httpx.TransportError as exc:
                outcome = f"{type(exc).__name__}"
                retry = True
            else:
                if r.status_code == 202:
                    sub.query_id = str(r.json()["query_id"])
                    sub.replayed = r.headers.get("Idempotent-Replayed") == "true"
                    return
                outcome = f"HTTP {r.status_code} {_error_code(r)}"
                # 409: the same key is still being processed by the previous try; 429: throttled.
                retry = r.status_code >= 500 or r.status_code in (409, 429)
            sub.errors.append(outcome)
            if not retry or attempt >= len(SUBMIT_RETRY_DELAYS):
                return
            await asyncio.sleep(SUBMIT_RETRY_DELAYS[attempt])

    # ------------------------------------------------------------------ faults

    async def _run_faults(self) -> None:
        tasks = []
        for t, kind in self.config.schedule():
            tasks.append(asyncio.create_task(self._fault_at(t, kind)))
        await asyncio.gather(*tasks)

    async def _fault_at(self, t: float, kind: str) -> None:
        delay = self.t0 + t - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            if kind == "child_kill":
                await self._child_kill()
            elif kind == "worker_kill":
                await self._worker_kill("scheduled")
            elif kind == "redis_restart":
                assert self.redis is not None
                await self._restart("redis", "SHUTDOWN NOSAVE", self.redis.shutdown_nosave, self.redis.start)
            elif kind == "rabbitmq_restart":
                assert self.rabbit is not None
                await self._restart("rabbitmq", "rabbitmqctl stop_app", self.rabbit.stop_app, self.rabbit.start_app)
            elif kind == "pg_restart":
                assert self.pg is not None
                await self._restart("pg", "pg_ctl -m immediate stop", self.pg.stop_immediate, self.pg.start)
        except Exception as exc:  # noqa: BLE001 - a failed injection is reported, the run goes on
            self.event("fault_error", fault=kind, error=f"{type(exc).__name__}: {exc}")

    def _live_slots(self) -> list[WorkerSlot]:
        return [s for s in self.slots if s.proc is not None and s.proc.alive() and not s.respawning]

    async def _child_kill(self) -> None:
        live = self._live_slots()
        if not live:
            self.event("child_kill_skipped", reason="no live worker")
            return
        slot, claims = await self._busiest(live)
        assert slot.proc is not None
        kids = slot.proc.child_pids()
        if kids:
            victim = self.rng.choice(kids)
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
            await asyncio.sleep(0.2)  # let it die before stamping the kill (see _kill_slot)
            self.kills.append(KillRecord(victim, 0.0, time.time()))
            self.event("child_kill", worker=slot.index, pid=victim, parent=slot.proc.pid)
            return
        # Celery's threads pool has no children: kill the whole worker instead (strictly harsher).
        self.counters["child_kills_substituted_by_worker_kills"] += 1
        await self._kill_slot(slot, claims, "child_kill_substitute")

    async def _worker_kill(self, why: str) -> None:
        live = self._live_slots()
        if not live:
            self.event("worker_kill_skipped", reason="no live worker")
            return
        slot, claims = await self._busiest(live)
        await self._kill_slot(slot, claims, why)

    async def _busiest(self, live: list[WorkerSlot]) -> tuple[WorkerSlot, int | None]:
        """The worker holding the most running claims (the harshest target; random when that is unknown),
        with that count (None when PostgreSQL could not be asked)."""
        try:
            owners: dict[int, int] | None = await asyncio.to_thread(self._running_by_pid)
        except Exception:  # noqa: BLE001 - PostgreSQL may be down right now
            owners = None
        counts = owners or {}
        self.rng.shuffle(live)
        slot = max(live, key=lambda s: counts.get(s.proc.pid, 0) if s.proc else 0)
        assert slot.proc is not None
        return slot, None if owners is None else counts.get(slot.proc.pid, 0)

    def _running_by_pid(self) -> dict[int, int]:
        conn = audit.connect(self.database_url, timeout=1)
        try:
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = 1000")
                cur.execute("SELECT lease_owner, count(*) FROM queries WHERE status = 'running' GROUP BY lease_owner")
                counts = ((report.owner_pid(owner), int(n)) for owner, n in cur.fetchall())
                return {pid: n for pid, n in counts if pid is not None}
        finally:
            conn.close()

    async def _kill_slot(self, slot: WorkerSlot, running_claims: int | None, why: str) -> None:
        """SIGKILL the slot's worker (`running_claims`: its claims at the last look) and schedule its respawn."""
        proc = slot.proc
        assert proc is not None
        slot.respawning = True
        pid = proc.pid
        await asyncio.to_thread(proc.kill)
        self.launcher.forget(proc)
        # Stamped once the process is certainly dead: every claim it made carries an earlier timestamp.
        self.kills.append(KillRecord(pid, proc.started_at, time.time()))
        self.event("worker_kill", worker=slot.index, pid=pid, why=why, running_claims=running_claims)
        self._respawn_later(slot)

    def _respawn_later(self, slot: WorkerSlot) -> None:
        """Bring the slot's worker back after `respawn_delay`, as a supervisor would."""
        task = self._spawn(self._respawn(slot))
        self._respawns.add(task)
        task.add_done_callback(self._respawns.discard)

    async def _respawn(self, slot: WorkerSlot) -> None:
        await asyncio.sleep(self.config.respawn_delay)
        if self._stopping:
            return
        self._start_worker(slot)
        slot.respawning = False
        assert slot.proc is not None
        self.event("worker_start", worker=slot.index, pid=slot.proc.pid, generation=slot.generation)

    async def _restart(self, server: str, how: str, stop: Callable[[], None], start: Callable[[], None]) -> None:
        """Stop a server (events `<server>_down` / `<server>_up`), keep it down a random while, start it again."""
        down = round(self.rng.uniform(self.config.down_min, self.config.down_max), 2)
        await asyncio.to_thread(stop)
        self.event(f"{server}_down", how=how, down_s=down)
        await asyncio.sleep(down)
        await asyncio.to_thread(start)
        self.event(f"{server}_up")

    # ------------------------------------------------------------------ supervision and sampling

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _supervise(self) -> None:
        """Notice processes that died without us killing them (a crash is a finding), and bring them back."""
        while not self._stopping:
            for slot in self.slots:
                proc = slot.proc
                if proc is not None and not slot.respawning and not proc.alive():
                    self.event(
                        "worker_exited_unexpectedly", worker=slot.index, pid=proc.pid, code=proc.popen.returncode
                    )
                    slot.respawning = True
                    self._respawn_later(slot)
            if self.api is not None and not self.api.alive():
                self.event("api_exited_unexpectedly", pid=self.api.pid, code=self.api.popen.returncode)
                self._start_api(int(self.api_url.rsplit(":", 1)[1]))
            if self.sim is not None and not self.sim.alive():
                self.event("simulator_exited_unexpectedly", pid=self.sim.pid, code=self.sim.popen.returncode)
            await asyncio.sleep(0.5)

    async def _sample(self) -> None:
        """Row counts by status and the broker queue depth every 2 s (gaps while a server is down)."""
        while not self._stopping:
            entry: dict[str, Any] = {"t": round(time.time() - self.t0, 1)}
            with contextlib.suppress(Exception):
                entry.update(await asyncio.to_thread(self._status_counts))
            with contextlib.suppress(Exception):
                entry["queue"] = await asyncio.to_thread(self._queue_depth)
            entry["workers_alive"] = len(self._live_slots())
            self.timeline.append(entry)
            await asyncio.sleep(2)

    def _status_counts(self) -> dict[str, int]:
        conn = audit.connect(self.database_url, timeout=2)
        try:
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = 2000")
                cur.execute("SELECT status, count(*) FROM queries GROUP BY status")
                return {str(s): int(n) for s, n in cur.fetchall()}
        finally:
            conn.close()

    def _queue_depth(self) -> int:
        if self.rabbit is not None:
            from kombu import Connection

            with Connection(self.rabbit.url, connect_timeout=1) as conn, conn.channel() as channel:
                return int(channel.queue_declare(self.queue_name, passive=True).message_count)
        import redis

        assert self.redis is not None
        client = redis.Redis(host="127.0.0.1", port=self.redis.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return int(client.llen(self.queue_name))  # type: ignore[arg-type]
        finally:
            client.close()

    # ------------------------------------------------------------------ drain

    def _terminal_among(self, ids: list[str]) -> set[str]:
        conn = audit.connect(self.database_url, timeout=3)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT id::text FROM queries WHERE id = ANY(%s::uuid[]) AND status = ANY(%s)",
                    (ids, list(audit.TERMINAL)),
                )
                return {r[0] for r in cur.fetchall()}
        finally:
            conn.close()

    async def _drain(self, stopped_at: float) -> float | None:
        """Wait until every accepted query is terminal; return when that happened (wall clock) or None."""
        left = {s.query_id for s in self.submissions if s.query_id}
        deadline = stopped_at + self.config.drain_timeout
        last_report = 0.0
        while time.time() < deadline:
            try:
                left -= await asyncio.to_thread(self._terminal_among, sorted(left))
            except Exception as exc:  # noqa: BLE001 - keep polling; the server may still be recovering
                self.say(f"drain poll failed: {type(exc).__name__}")
            if not left:
                return time.time()
            if time.time() - last_report > 10:
                self.say(f"draining: {len(left)} accepted queries not terminal yet")
                last_report = time.time()
            await asyncio.sleep(0.5)
        return None

    # ------------------------------------------------------------------ the run

    async def run(self) -> dict[str, Any]:
        c = self.config
        await self.setup()
        self.t0 = time.time()
        self._spawn(self._supervise())
        self._spawn(self._sample())
        await self._sim_config(c.fault_rates())
        self.event("llm_faults_on", **c.fault_rates())
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        async with httpx.AsyncClient(base_url=self.api_url, timeout=SUBMIT_TIMEOUT_SECONDS, limits=limits) as client:
            load = asyncio.create_task(self._submit_all(client))
            faults = asyncio.create_task(self._run_faults())
            await asyncio.sleep(max(0.0, self.t0 + c.duration - time.time()))
            # The window is over: no new fault starts; one in progress finishes restoring its server.
            await self._sim_config(dict.fromkeys(c.fault_rates(), 0.0))
            self.event("llm_faults_off")
            await faults
            await self._restore_all()
            stopped_at = time.time()
            self.event("faults_stopped")
            await load
        accepted = sum(1 for s in self.submissions if s.query_id)
        self.say(f"load done: {accepted}/{len(self.submissions)} accepted; draining")
        drained_at = await self._drain(stopped_at)
        if drained_at is not None:
            self.event("drained", drain_s=round(drained_at - stopped_at, 2))
        else:
            self.event("drain_deadline_passed", timeout_s=c.drain_timeout)
        self._stopping = True
        self.code_digest_end = code_digest()
        sim_stats = await self._sim_stats()
        data = await asyncio.to_thread(audit.fetch, self.database_url)
        logs = report.scan_logs(
            self.logs, self.pg.log_path if self.pg else None, self.redis.log_path if self.redis else None
        )
        return report.build(self, data, sim_stats, stopped_at, drained_at, logs)

    async def _restore_all(self) -> None:
        """Make sure every server and every worker slot is up again before the drain clock starts."""
        await asyncio.gather(*self._respawns)
        if self.redis is not None and not self.redis.running():
            await asyncio.to_thread(self.redis.start)
            self.event("redis_up", why="restore")
        if self.pg is not None and not self.pg.running():
            await asyncio.to_thread(self.pg.start)
            self.event("pg_up", why="restore")
        if self.rabbit is not None and not self.rabbit.running():
            await asyncio.to_thread(self.rabbit.start_app)
            self.event("rabbitmq_up", why="restore")

    async def _sim_stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.get(f"{self.sim_url}/_sim/stats", params={"queries": "1"})
            r.raise_for_status()
            result: dict[str, Any] = r.json()
            return result

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Stop everything we started and delete the temp directory (logs are copied first if asked)."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self.launcher.stop_all(timeout=3)
        if self.redis is not None:
            self.redis.close()
        if self.rabbit is not None:
            with contextlib.suppress(Exception):
                self.rabbit.close()
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg.close()
        if self.config.keep_logs is not None:
            self.copy_logs(self.config.keep_logs)
        shutil.rmtree(self.base, ignore_errors=True)
        self.reaper.disarm()

    def copy_logs(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.logs.glob("*.log")):
            shutil.copy2(path, dest / path.name)
        if self.pg is not None and self.pg.log_path.exists():
            shutil.copy2(self.pg.log_path, dest / "postgres.log")
        if self.redis is not None and self.redis.log_path.exists():
            shutil.copy2(self.redis.log_path, dest / "redis.log")
        if self.rabbit is not None and self.rabbit.log_path.exists():
            shutil.copy2(self.rabbit.log_path, dest / "rabbitmq.log")


def code_digest() -> str:
    """Hash of the code a (re)started process would load; a change during a run mixes versions."""
    digest = hashlib.sha256()
    for package in ("api", "worker", "shared", "migrations"):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode())
            with contextlib.suppress(OSError):
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _error_code(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return "-"
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("code") or err.get("type") or "-")
        return str(body.get("code") or "-")
    return "-"
