"""The fixtures of the whole run; the helpers they and the tests use live in `tests/support/`.

Real services: PostgreSQL, Redis, the simulator, the API and a Celery worker. PostgreSQL and Redis come from
TEST_DATABASE_URL / TEST_REDIS_URL (CI sets them to the machine's servers) or are started embedded. Each run
gets a throwaway database built by `alembic upgrade head` and its own queue name, so runs never see each
other's rows or messages. The repository tests get a second throwaway database that no process touches.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession

from devkit import embedded
from devkit.procs import free_port, spawn
from shared.config import Settings
from shared.db import make_engine, make_raw_pool, make_sessionmaker
from tests.support.amqp import delete_amqp_queues
from tests.support.api import register_and_login
from tests.support.db import throwaway_database
from tests.support.polling import wait_for_http
from tests.support.stack import Stack, running_stack, stack_settings


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Spread the tests that take a stack turn (each runs for 10-25 s) evenly over the run: under pytest-xdist they
    then seldom wait for each other's turn, and do not end the run together on one worker while the other idles."""
    turns = [item for item in items if "stack_turn" in getattr(item, "fixturenames", ())]
    if not turns:
        return
    rest = [item for item in items if "stack_turn" not in getattr(item, "fixturenames", ())]
    step = len(rest) / len(turns)
    for k, item in enumerate(turns):
        rest.insert(round(step * (k + 0.5)) + k, item)
    items[:] = rest


@pytest.fixture
def stack_turn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Held by a test that starts a whole stack of its own (tests/support/flow.py): under pytest-xdist such tests
    take turns across the workers, as two at once could take most of PostgreSQL's 100 connections."""
    # A pytest-xdist worker's base temp sits in the run's own: the lock is per run, held by one worker at a time.
    lock = tmp_path_factory.getbasetemp().parent / "aiq-stack-turn.lock"
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


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
    """A throwaway database migrated to head, the one the stack runs on; dropped at the end of the run."""
    with throwaway_database(server_urls["database"]) as url:
        yield url


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


@pytest.fixture(scope="session")
def stack(database_url: str, server_urls: dict[str, str], simulator: str, tmp_root: Path) -> Iterator[Stack]:
    """uvicorn and a Celery worker as real processes on Redis as the broker, configured through the environment."""
    values = stack_settings(database_url, server_urls["redis"], simulator)
    with running_stack(values, simulator, tmp_root) as running:
        yield running


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """RabbitMQ's URL (TEST_AMQP_URL); the AMQP tests are skipped without it."""
    url = os.environ.get("TEST_AMQP_URL")
    if not url:
        pytest.skip("TEST_AMQP_URL is unset: no RabbitMQ for the AMQP broker tests (.ci/run sets it when 5672 answers)")
    return url


@pytest.fixture(scope="session")
def amqp_database_url(amqp_url: str, server_urls: dict[str, str]) -> Iterator[str]:
    """A throwaway database of the RabbitMQ stack's own: only its worker sweeps it (no cross-broker re-sends)."""
    with throwaway_database(server_urls["database"]) as url:
        yield url


@pytest.fixture(scope="session")
def amqp_stack(
    amqp_url: str, amqp_database_url: str, server_urls: dict[str, str], simulator: str, tmp_root: Path
) -> Iterator[Stack]:
    """The same processes with BROKER_URL on RabbitMQ and a queue of their own, deleted at the end."""
    values = stack_settings(amqp_database_url, server_urls["redis"], simulator, broker_url=amqp_url)
    try:
        with running_stack(values, simulator, tmp_root / "amqp") as running:
            yield running
    finally:
        delete_amqp_queues(amqp_url, values["QUEUE_NAME"])


@pytest.fixture(scope="session")
def amqp_db(amqp_database_url: str) -> Iterator[Engine]:
    """A plain sync engine on the RabbitMQ stack's database."""
    engine = create_engine(Settings(database_url=amqp_database_url).sync_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    """An HTTP client on the stack's API."""
    with httpx.Client(base_url=stack.api_url, timeout=10) as c:
        yield c


@pytest.fixture(scope="session")
def db(database_url: str) -> Iterator[Engine]:
    """A plain sync engine for looking at rows the way an operator would."""
    engine = create_engine(Settings(database_url=database_url).sync_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def user(client: httpx.Client) -> dict[str, Any]:
    """A fresh user, registered and logged in (see `register_and_login`)."""
    return register_and_login(client)


@pytest.fixture(scope="session")
def repo_database_url(server_urls: dict[str, str]) -> Iterator[str]:
    """A second throwaway database for the repository tests: no worker sweeps it, so they see only their rows."""
    with throwaway_database(server_urls["database"]) as url:
        yield url


@pytest.fixture(scope="session")
def repo_db(repo_database_url: str) -> Iterator[Engine]:
    """A plain sync engine on the repository tests' database, to set rows up and look at them."""
    engine = create_engine(Settings(database_url=repo_database_url).sync_database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """`@pytest.mark.anyio` tests run on asyncio, the only loop asyncpg supports."""
    return "asyncio"


@pytest.fixture
async def repo_conn(repo_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw asyncpg connection from the API's own pool factory; each statement autocommits."""
    pool = await make_raw_pool(Settings(database_url=repo_database_url), "aiq-tests")
    try:
        async with pool.acquire() as conn:
            yield conn
    finally:
        await pool.close()


@pytest.fixture
async def repo_session(repo_database_url: str) -> AsyncIterator[AsyncSession]:
    """A SQLAlchemy AsyncSession like the worker's loops use; the test owns the transaction."""
    engine = make_engine(Settings(database_url=repo_database_url), "aiq-tests")
    try:
        async with make_sessionmaker(engine)() as session:
            yield session
    finally:
        await engine.dispose()
