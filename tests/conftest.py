"""Real services for the whole run: PostgreSQL, Redis, the simulator, the API and a Celery worker.

PostgreSQL and Redis come from TEST_DATABASE_URL / TEST_REDIS_URL (CI sets them to the machine's servers)
or are started embedded. Each run gets a throwaway database built by `alembic upgrade head` and its own
queue name, so runs never see each other's rows or messages.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from devkit import embedded
from devkit.migrations import migrate
from devkit.procs import Launcher, free_port, spawn
from shared.config import Settings

TEST_PASSWORD = "correct horse battery staple"


def wait_for_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    # Short on purpose: unix socket paths of the embedded servers are limited to ~100 characters.
    with tempfile.TemporaryDirectory(prefix="aiqt-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def server_urls(tmp_root: Path) -> dict[str, str]:
    """URLs of a PostgreSQL server (its maintenance database) and a Redis server."""
    db = os.environ.get("TEST_DATABASE_URL") or embedded.start_postgres(tmp_root / "svc")
    redis = os.environ.get("TEST_REDIS_URL") or embedded.start_redis(tmp_root / "svc")
    return {"database": db, "redis": redis}


@pytest.fixture(scope="session")
def database_url(server_urls: dict[str, str]) -> Iterator[str]:
    """A throwaway database migrated to head; dropped at the end of the run."""
    name = f"aiq_test_{uuid.uuid4().hex[:12]}"
    url = embedded.create_database(server_urls["database"], name)
    migrate(url)
    yield url
    embedded.drop_database(server_urls["database"], name)


@pytest.fixture(scope="session")
def simulator(tmp_root: Path) -> Iterator[str]:
    """The project's OpenAI-compatible simulator as a real HTTP server; yields its base URL."""
    port = free_port()
    argv = [sys.executable, "-m", "devkit.simulator", "--port", str(port), "--latency-ms", "50"]
    proc = spawn("simulator", [*argv, "--api-key", "sk-test-sim-key-0123456789"], log=tmp_root / "simulator.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/healthz", proc=proc.popen)
        yield base
    finally:
        proc.stop(10)


@dataclass
class Stack:
    """What the tests talk to, and where the processes log."""

    settings: Settings
    env: dict[str, str]
    api_url: str
    simulator_url: str
    logs: dict[str, Path] = field(default_factory=dict)

    def read_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs.values() if p.exists())


def stack_settings(database_url: str, redis_url: str, simulator_url: str) -> dict[str, str]:
    return {
        "ENVIRONMENT": "test",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "QUEUE_NAME": f"aiq.test.{uuid.uuid4().hex[:8]}",
        "JWT_SECRET_KEY": secrets.token_urlsafe(48),
        "OPENAI_API_KEY": "sk-test-sim-key-0123456789",
        "OPENAI_BASE_URL": f"{simulator_url}/v1",
        "ALLOWED_MODELS": "sim-small,sim-large",
        "DEFAULT_MODEL": "sim-small",
        "MAX_QUERY_CHARS": "2000",
        "MAX_OUTPUT_TOKENS": "4096",
        "MAX_ATTEMPTS": "3",
        "RETRY_BASE_SECONDS": "0.2",
        "RETRY_MAX_SECONDS": "1",
        "LLM_TIMEOUT_SECONDS": "3",
        "BCRYPT_ROUNDS": "4",
        "WORKER_CONCURRENCY": "50",
        # Fast recovery so the tests can watch it happen.
        "LEASE_SECONDS": "3",
        "HEARTBEAT_SECONDS": "0.5",
        "SWEEP_INTERVAL_SECONDS": "1",
        "STALE_PENDING_SECONDS": "3",
        "SHUTDOWN_GRACE_SECONDS": "2",
        "WORKER_METRICS_PORT": str(free_port()),
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture(scope="session")
def stack(database_url: str, server_urls: dict[str, str], simulator: str, tmp_root: Path) -> Iterator[Stack]:
    """uvicorn and a Celery worker as real processes, configured only through the environment."""
    values = stack_settings(database_url, server_urls["redis"], simulator)
    env = {**os.environ, **values}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    port = free_port()
    logs = {"api": tmp_root / "api.log", "worker": tmp_root / "worker.log"}
    launcher = Launcher(tmp_root)
    api = launcher.start(
        "api", [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)], env
    )
    worker = launcher.start(
        "worker",
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--hostname", f"test-{port}@%h"],
        env,
    )
    api_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{api_url}/readyz", proc=api.popen)
        wait_for_http(f"http://127.0.0.1:{values['WORKER_METRICS_PORT']}/healthz", timeout=60, proc=worker.popen)
        settings = Settings(**{k.lower(): v for k, v in values.items()})  # type: ignore[arg-type]
        yield Stack(settings=settings, env=env, api_url=api_url, simulator_url=simulator, logs=logs)
    finally:
        launcher.stop_all(timeout=20)


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, timeout=10) as c:
        yield c


@pytest.fixture(scope="session")
def db(database_url: str) -> Iterator[Engine]:
    """A plain sync engine for looking at rows the way an operator would."""
    engine = create_engine(Settings(database_url=database_url).sync_database_url)
    yield engine
    engine.dispose()


def register_and_login(client: httpx.Client, password: str = TEST_PASSWORD) -> dict[str, Any]:
    """A fresh user; returns its email, tokens and ready-made auth headers."""
    email = f"user-{uuid.uuid4().hex[:10]}@example.com"
    r = client.post("/api/v1/auth/register", json={"email": email, "password": password})
    assert r.status_code == 201, r.text
    r = client.post("/api/v1/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    tokens = r.json()
    headers = _bearer(tokens["access_token"])
    user_id = client.get("/api/v1/users/me", headers=headers).json()["id"]
    return {"email": email, "user_id": user_id, "tokens": tokens, "headers": headers}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def user(client: httpx.Client) -> dict[str, Any]:
    return register_and_login(client)


def wait_terminal(client: httpx.Client, headers: dict[str, str], query_id: str, timeout: float = 30) -> dict[str, Any]:
    """Poll like a client until the query reaches a terminal state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/api/v1/query/{query_id}", headers=headers).json()
        if body["status"] in ("completed", "failed", "cancelled"):
            return body
        time.sleep(0.1)
    raise TimeoutError(f"query {query_id} not terminal after {timeout}s: {body}")


def count_rows(db: Engine, sql: str, **params: Any) -> int:
    with db.connect() as conn:
        return int(conn.execute(text(sql), params).scalar_one())


def spawn_worker(stack: Stack, log_path: Path, **overrides: str) -> tuple[subprocess.Popen[bytes], str]:
    """An extra worker process on the stack's queue; returns it once it is ready, with its metrics URL."""
    port = str(free_port())
    env = {**stack.env, "WORKER_METRICS_PORT": port, **overrides}
    proc = spawn(
        "worker",
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--hostname", f"extra-{port}@%h"],
        env=env,
        log=log_path,
    ).popen
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/healthz", timeout=60, proc=proc)
    return proc, url


def spawn_api(stack: Stack, log_path: Path, **overrides: str) -> tuple[subprocess.Popen[bytes], str]:
    """An extra API process (e.g. pointed at a dead broker)."""
    port = free_port()
    env = {**stack.env, **overrides}
    proc = spawn(
        "api",
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        log=log_path,
    ).popen
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/healthz", proc=proc)
    return proc, url


def stop(proc: subprocess.Popen[Any], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL when the process has not exited within `timeout`."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sim_calls(stack: Stack, query_id: str) -> int:
    """How many chat-completion calls the simulator has received for this query."""
    stats = httpx.get(f"{stack.simulator_url}/_sim/stats").json()
    return int(stats["calls_by_query"].get(query_id, 0))


def wait_until(predicate: Any, timeout: float = 20, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met")


def row(db: Engine, query_id: str) -> dict[str, Any]:
    with db.connect() as conn:
        return dict(conn.execute(text("SELECT * FROM queries WHERE id = :id"), {"id": query_id}).mappings().one())


def insert_query(db: Engine, user_id: str, prompt: str = "stored directly", **sql: str) -> str:
    """Store a queries row without the API: a message never sent, an orphaned claim, a parked retry.

    Extra columns are given as SQL expressions (test-only, trusted), e.g. `status="'running'"`.
    """
    query_id = str(uuid.uuid4())
    columns = ", ".join(["id", "user_id", "prompt", "model", *sql])
    values = ", ".join([":id", ":u", ":p", "'sim-small'", *sql.values()])
    with db.begin() as conn:
        conn.execute(
            text(f"INSERT INTO queries ({columns}) VALUES ({values})"),  # noqa: S608 - test-only, literal input
            {"id": query_id, "u": user_id, "p": prompt},
        )
    return query_id


def publish_to(stack: Stack, queue: str, *query_ids: str) -> None:
    """Send `queries.process` for these ids to a given queue (e.g. one only a particular worker reads)."""
    from shared.queue import Publisher

    publisher = Publisher(stack.settings.model_copy(update={"queue_name": queue}))
    try:
        for query_id in query_ids:
            publisher.publish_sync(uuid.UUID(query_id))
    finally:
        publisher.close()
