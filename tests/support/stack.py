"""The processes under test: the Stack the session fixture starts, extra API/worker processes, the queue."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from devkit.procs import Launcher, free_port, spawn
from shared.config import Settings
from shared.events import wake_channel
from shared.queue import Publisher
from tests.support.polling import wait_for_http, wait_until


@dataclass
class Stack:
    """What the tests talk to, and where the processes log."""

    settings: Settings
    env: dict[str, str]
    api_url: str
    simulator_url: str
    logs: dict[str, Path] = field(default_factory=dict)

    def read_logs(self) -> str:
        """Everything the stack's processes have logged so far."""
        return "\n".join(p.read_text(errors="replace") for p in self.logs.values() if p.exists())


def stack_settings(
    database_url: str, redis_url: str, simulator_url: str, broker_url: str | None = None
) -> dict[str, str]:
    """The environment of the stack's processes: a queue of its own and timings short enough to watch.

    `broker_url` None: the broker is Redis at `redis_url` (BROKER_URL unset, as by default).
    """
    broker = {} if broker_url is None else {"BROKER_URL": broker_url}
    return {
        **broker,
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
        "MAX_CONVERSATION_CHARS": "5000",
        "MAX_OUTPUT_TOKENS": "4096",
        "MAX_ATTEMPTS": "3",
        "RETRY_BASE_SECONDS": "0.2",
        "RETRY_MAX_SECONDS": "1",
        "LLM_TIMEOUT_SECONDS": "3",
        "BCRYPT_ROUNDS": "4",
        "WORKER_CONCURRENCY": "50",
        # Small pools: a run holds several stacks at once (one per pytest-xdist worker, the RabbitMQ one, the flow
        # tests' own) on a server that allows 100 connections, and the defaults let each process keep 20 open.
        "DB_POOL_SIZE": "5",
        "DB_MAX_OVERFLOW": "5",
        # Fast recovery so the tests can watch it happen.
        "LEASE_SECONDS": "3",
        "HEARTBEAT_SECONDS": "0.5",
        "SWEEP_INTERVAL_SECONDS": "1",
        "STALE_PENDING_SECONDS": "3",
        "SHUTDOWN_GRACE_SECONDS": "2",
        "WORKER_METRICS_PORT": str(free_port()),
        "API_METRICS_PORT": str(free_port()),
        "API_METRICS_HOST": "127.0.0.1",
        "LOG_LEVEL": "INFO",
        # Limits on, but out of the way of tests that are not about them (tests/api/test_limits.py starts
        # API processes with tight ones). uvicorn must not rewrite the client address: TRUSTED_PROXIES decides.
        "LIMIT_REQUESTS_PER_MINUTE": "100000",
        "LIMIT_MAX_PENDING": "100000",
        "LIMIT_TOKEN_BUDGET": "1000000000",
        "REGISTER_PER_HOUR": "100000",
        "LOGIN_MAX_FAILURES": "1000",
        "LOGIN_ADDRESS_MAX_FAILURES": "1000",
        "FORWARDED_ALLOW_IPS": "",
        # Webhooks: the tests' receivers listen on loopback, and retries come quickly enough to watch.
        "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "WEBHOOK_RETRY_DELAYS_SECONDS": "1,1,1",
        "WEBHOOK_TIMEOUT_SECONDS": "3",
    }


@contextmanager
def running_stack(values: dict[str, str], simulator_url: str, log_dir: Path) -> Iterator[Stack]:
    """uvicorn and a Celery worker as real processes, configured only through the environment `values`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **values}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    port = free_port()
    logs = {"api": log_dir / "api.log", "worker": log_dir / "worker.log"}
    launcher = Launcher(log_dir)
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
        yield Stack(settings=settings, env=env, api_url=api_url, simulator_url=simulator_url, logs=logs)
    finally:
        launcher.stop_all(timeout=20)


def spawn_worker(stack: Stack, log_path: Path, **overrides: str) -> tuple[subprocess.Popen[bytes], str]:
    """An extra worker process on the stack's queue; returns it once it is ready, with its metrics URL."""
    port = str(free_port())
    # Celery's node name: `%h` becomes the host's name, in the command and in the worker's "<name>@<host> ready.".
    name = f"extra-{port}@"
    env = {**stack.env, "WORKER_METRICS_PORT": port, **overrides}
    proc = spawn(
        "worker",
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--hostname", f"{name}%h"],
        env=env,
        log=log_path,
    ).popen
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/healthz", timeout=60, proc=proc)
    # Healthy is not yet consuming: the health server starts first, then the broker connection and Celery's
    # mingle (about a second). A test whose queries must reach this worker waits for its "ready." line.
    wait_until(
        lambda: (
            proc.poll() is not None
            or any(name in line and " ready." in line for line in log_path.read_text(errors="replace").splitlines())
        ),
        timeout=60,
        interval=0.1,
    )
    if proc.poll() is not None:
        raise RuntimeError(f"the extra worker exited: {log_path.read_text(errors='replace')[-3000:]}")
    return proc, url


def spawn_api(stack: Stack, log_path: Path, **overrides: str) -> tuple[subprocess.Popen[bytes], str]:
    """An extra API process (e.g. pointed at a dead broker)."""
    port = free_port()
    # A metrics port of its own: a shared one (SO_REUSEPORT) would hand scrapes to either process.
    env = {**stack.env, "API_METRICS_PORT": str(free_port()), **overrides}
    proc = spawn(
        "api",
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        log=log_path,
    ).popen
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/healthz", proc=proc)
    return proc, url


@contextmanager
def idle_api(stack: Stack, log_path: Path) -> Iterator[str]:
    """An extra API (its URL) on a queue no worker reads, with a 0.3 s keep-alive: a query stays pending and its
    stream open, on keep-alives only, until something else ends it (the credential re-check)."""
    queue = f"aiq.idle.{uuid.uuid4().hex[:6]}"
    api, url = spawn_api(stack, log_path, QUEUE_NAME=queue, SSE_KEEPALIVE_SECONDS="0.3")
    try:
        yield url
    finally:
        stop(api)


def api_metrics(stack: Stack) -> str:
    """The session API's Prometheus exposition, from its metrics port (never the public one)."""
    return httpx.get(f"http://127.0.0.1:{stack.env['API_METRICS_PORT']}/metrics").text


def metric_value(metrics_url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`, read from an API's metrics port."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(metrics_url).text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


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


def publish_to(stack: Stack, queue: str, *query_ids: str) -> None:
    """Send `queries.process` for these ids to a given queue (e.g. one only a particular worker reads)."""
    publisher = Publisher(stack.settings.model_copy(update={"queue_name": queue}))
    try:
        for query_id in query_ids:
            publisher.publish_sync(uuid.UUID(query_id))
    finally:
        publisher.close()


@contextmanager
def wake_notices(stack: Stack) -> Iterator[Callable[[str], list[str]]]:
    """Listen to the wake-up channel; yields `heard(query_id)`: the event types of that query's notices heard
    within a second from the call."""
    client = redis.Redis.from_url(stack.settings.redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(wake_channel(stack.settings))

    def heard(query_id: str) -> list[str]:
        notices: list[str] = []
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
            if message is not None and message["data"].decode().startswith(query_id):
                notices.append(message["data"].decode().split()[1])
        return notices

    try:
        yield heard
    finally:
        pubsub.close()
        client.close()
