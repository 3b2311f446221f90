"""Embedded PostgreSQL/Redis really start, answer and go away; `aiq dev`'s supervisor stops its children.

Real servers in short /tmp directories (unix-socket paths are limited to ~100 characters); the whole
module takes a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
import redis.asyncio as aioredis

from devkit import embedded
from devkit.paths import ROOT
from devkit.procs import spawn
from shared.config import Settings
from shared.events import EventLog, EventType
from shared.wakeup import Wakeup

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A fresh short directory; any embedded servers started under it are stopped afterwards."""
    path = Path(tempfile.mkdtemp(prefix="aiqe-", dir="/tmp"))
    try:
        yield path
    finally:
        embedded.stop_embedded(path)
        subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    """One embedded PostgreSQL and Redis for the module (not the session's: those are conftest's)."""
    path = Path(tempfile.mkdtemp(prefix="aiqm-", dir="/tmp"))
    try:
        yield {"base": str(path), "pg": embedded.start_postgres(path), "redis": embedded.start_redis(path)}
    finally:
        embedded.stop_embedded(path)
        subprocess.run(["rm", "-rf", str(path)], check=False)


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def scalar(url: str, sql: str) -> object:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone()
            assert row is not None
            return row[0]
    finally:
        conn.close()


def test_postgres_answers_on_a_unix_socket(servers: dict[str, str]) -> None:
    url = servers["pg"]
    assert url == f"postgresql://postgres:@/postgres?host={servers['base']}/pg"
    assert scalar(url, "SELECT 40 + 2") == 42
    assert str(scalar(url, "SHOW server_version")).startswith("16")


def test_redis_answers_on_a_unix_socket(servers: dict[str, str]) -> None:
    url = servers["redis"]
    assert url.startswith("unix:///")
    assert url.endswith("/redis.socket")
    client = redis.Redis.from_url(url)
    try:
        assert client.ping() is True
        client.set("aiq-test", "v")
        assert client.get("aiq-test") == b"v"
    finally:
        client.close()


def test_starting_twice_returns_the_same_server(servers: dict[str, str]) -> None:
    base = Path(servers["base"])
    assert embedded.start_postgres(base) == servers["pg"]
    assert embedded.start_redis(base) == servers["redis"]


def _server_urls(servers: dict[str, str]) -> list[str]:
    urls = [servers["pg"]]
    if os.environ.get("TEST_DATABASE_URL"):
        urls.append(os.environ["TEST_DATABASE_URL"])  # TCP form, when CI points at a real server
    return urls


@pytest.mark.parametrize("which", ["embedded", "tcp"])
def test_create_and_drop_database(servers: dict[str, str], which: str) -> None:
    urls = _server_urls(servers)
    if which == "tcp" and len(urls) < 2:
        pytest.skip("TEST_DATABASE_URL is not set")
    server_url = urls[0] if which == "embedded" else urls[1]
    name = f"aiq_emb_{uuid.uuid4().hex[:10]}"
    url = embedded.create_database(server_url, name)
    assert url == embedded.database_url(server_url, name)
    assert scalar(url, "SELECT current_database()") == name
    held = psycopg2.connect(url)  # DROP ... WITH (FORCE) must not be blocked by an open session
    try:
        embedded.drop_database(server_url, name)
    finally:
        held.close()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(url).close()
    embedded.drop_database(server_url, name)  # dropping a missing database is fine


def test_database_url_keeps_socket_dir_and_tcp_parts() -> None:
    socket_url = "postgresql://postgres:@/postgres?host=/tmp/x/pg"
    assert embedded.database_url(socket_url, "aiq_t") == "postgresql://postgres:@/aiq_t?host=/tmp/x/pg"
    tcp = "postgresql+psycopg2://u:p@127.0.0.1:5432/postgres?sslmode=disable"
    assert embedded.database_url(tcp, "aiq_t") == "postgresql+psycopg2://u:p@127.0.0.1:5432/aiq_t?sslmode=disable"


@pytest.mark.parametrize("name", ["", "a-b", "x; DROP DATABASE postgres", "9lives", "a" * 64])
def test_odd_database_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="database names"):
        embedded.create_database("postgresql://postgres@127.0.0.1:1/postgres", name)


def test_ensure_services_prefers_the_environment(short_dir: Path) -> None:
    env = {"DATABASE_URL": "postgresql://db.example:5432/aiq", "REDIS_URL": "redis://cache.example:6379/0"}
    assert embedded.ensure_services(short_dir, env) == env
    assert not (short_dir / "pg").exists()
    assert not (short_dir / "redis").exists()


def test_ensure_services_starts_only_what_is_missing(
    servers: dict[str, str], capfd: pytest.CaptureFixture[str]
) -> None:
    urls = embedded.ensure_services(Path(servers["base"]), {"DATABASE_URL": "postgresql://elsewhere/aiq"})
    assert urls == {"DATABASE_URL": "postgresql://elsewhere/aiq", "REDIS_URL": servers["redis"]}
    err = capfd.readouterr().err
    assert "embedded Redis" in err
    assert "PostgreSQL" not in err


def test_long_base_dir_moves_to_a_short_one() -> None:
    long_dir = Path("/tmp") / ("very-long-checkout-path-" * 5)
    short = embedded.short_base_dir(long_dir)
    assert short.parent == Path("/tmp")
    assert short.name.startswith("aiq-")
    assert embedded.short_base_dir(long_dir) == short  # stable across runs
    assert embedded.short_base_dir(Path("/tmp/aiq-x")) == Path("/tmp/aiq-x")


HOLDER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from devkit import embedded
    base = Path(sys.argv[1])
    urls = {"pg": embedded.start_postgres(base), "redis": embedded.start_redis(base)}
    pids = {s.kind: s.pid for s in embedded._started.values()}
    print(json.dumps({**urls, "pids": pids, "watchdog": embedded._watchdog.pid}), flush=True)
    time.sleep(120)
    """
)


def _start_holder(base: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(base)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    info: dict[str, Any] = json.loads(proc.stdout.readline())
    return proc, info


def _alive(pid: int) -> bool:
    return embedded._pid_alive(pid)


def test_watchdog_stops_the_servers_of_a_killed_process(short_dir: Path) -> None:
    proc, info = _start_holder(short_dir)
    pids = info["pids"]
    assert all(_alive(pid) for pid in pids.values())
    proc.kill()  # no atexit: only the watchdog can clean up
    proc.wait()
    assert wait_until(lambda: not any(_alive(pid) for pid in pids.values())), "servers outlived their owner"


def test_leftover_servers_are_reused_then_stopped(short_dir: Path) -> None:
    proc, info = _start_holder(short_dir)
    pids = info["pids"]
    os.kill(info["watchdog"], signal.SIGKILL)  # owner and watchdog gone: the servers are left running
    proc.kill()
    proc.wait()
    time.sleep(0.3)
    assert all(_alive(pid) for pid in pids.values())

    assert embedded.start_postgres(short_dir) == info["pg"]
    assert embedded.start_redis(short_dir) == info["redis"]
    assert scalar(info["pg"], "SELECT 1") == 1
    # The killed holder's pid is still in the handle files; it must not keep the servers alive.
    embedded.stop_embedded(short_dir)
    assert wait_until(lambda: not any(_alive(pid) for pid in pids.values()), 5)


CELERY_APP = textwrap.dedent(
    """
    import os
    from celery import Celery
    app = Celery("sockapp", broker=os.environ["BROKER"], backend=os.environ["BROKER"], set_as_current=False)
    app.conf.broker_connection_retry_on_startup = True

    @app.task(name="sockapp.add")
    def add(x, y):
        return x + y
    """
)


def test_celery_threads_worker_over_redis_socket(servers: dict[str, str], tmp_path: Path) -> None:
    """The app turns unix:///x.sock into kombu's redis+socket:///x.sock; a threads pool must work on it."""
    (tmp_path / "sockapp.py").write_text(CELERY_APP)
    broker = "redis+socket://" + servers["redis"].removeprefix("unix://")
    env = {**os.environ, "BROKER": broker, "PYTHONPATH": str(tmp_path)}
    worker = spawn(
        "worker",
        [sys.executable, "-m", "celery", "-A", "sockapp", "worker", "-P", "threads", "-c", "4", "--without-mingle"],
        env=env,
        cwd=tmp_path,
    )
    sys.path.insert(0, str(tmp_path))
    os.environ["BROKER"] = broker
    try:
        import sockapp

        try:
            results = [sockapp.add.delay(i, i) for i in range(10)]
            assert [r.get(timeout=30) for r in results] == [2 * i for i in range(10)]
        finally:
            sockapp.app.close()
    finally:
        worker.stop(20)
        sys.path.remove(str(tmp_path))
        os.environ.pop("BROKER", None)
        sys.modules.pop("sockapp", None)


SUPERVISED = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from devkit.devstack import Console
    from devkit.procs import Launcher, StopFlag

    CHILD = '''
    import os, signal, subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
    print("child", os.getpid(), "grandchild", grandchild.pid, flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    time.sleep(120)
    '''
    flag = StopFlag()
    flag.install()
    launcher = Launcher(echo=Console(sys.stdout, colour=False).line, cwd=Path.cwd())
    launcher.start("kid", [sys.executable, "-c", CHILD])
    while not flag.event.wait(0.1):
        pass
    launcher.stop_all(timeout=3, abort=lambda: flag.force)
    print("stopped", flush=True)
    """
)


def _start_supervised() -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISED], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("kid    | child "), first
    words = first.split()
    return proc, int(words[3]), int(words[5])


def test_supervisor_prefixes_output_and_kills_the_whole_group() -> None:
    proc, child, grandchild = _start_supervised()
    assert proc.stdout is not None
    assert proc.stdout.readline() == "kid    | to stderr\n"
    proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers
    rest, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert rest.endswith("stopped\n")
    # The grandchild ignores SIGTERM; only the SIGKILL sweep of the process group ends it.
    assert wait_until(lambda: not _alive(child) and not _alive(grandchild), 5)


@pytest.mark.skipif(sys.platform != "linux", reason="uses Linux's parent-death signal")
def test_children_die_with_a_killed_supervisor() -> None:
    proc, child, grandchild = _start_supervised()
    proc.kill()  # no cleanup runs; the kernel's parent-death signal must reach the child
    proc.wait()
    try:
        assert wait_until(lambda: not _alive(child), 5)
    finally:
        for pid in (child, grandchild):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.anyio
async def test_the_wakeup_subscriber_listens_over_a_unix_socket(servers: dict[str, str]) -> None:
    # The embedded Redis (`make dev`, the bench) is a unix socket: the subscriber must subscribe there too,
    # or every long-poll falls back to re-reading at each reconnect attempt.
    settings = Settings(redis_url=servers["redis"], queue_name=f"aiq.wake.{uuid.uuid4().hex[:6]}")
    wakeup = Wakeup(settings)
    wakeup.start()
    client = aioredis.Redis.from_url(servers["redis"])
    query_id = uuid.uuid4()
    try:
        await asyncio.wait_for(wakeup.subscribed.wait(), 10)
        with wakeup.watch(query_id, only_terminal=True) as waiter:
            await EventLog(client, settings).append(query_id, EventType.COMPLETED, {}, 1)
            assert await waiter.wait(5)
        assert wakeup.connected
    finally:
        await wakeup.stop()
        await client.aclose()
