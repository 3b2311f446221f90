"""`aiq dev` (`make dev`): the whole service on one machine, with nothing installed by hand.

Embedded PostgreSQL/Redis where DATABASE_URL/REDIS_URL are unset, the LLM simulator where
OPENAI_API_KEY is unset, migrations, then API, worker, beat (when scheduled) and Flower as child
processes sharing one environment, their output prefixed by name. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values

from shared import embedded
from shared.cli import find_repo_root

LABEL_WIDTH = 6
STOP_TIMEOUT = 10.0
READY_TIMEOUT = 90.0
SIMULATOR_API_KEY = "sk-aiq-dev-simulator"  # the simulator accepts any key; the SDK insists on one
_COLOURS = {"api": "32", "worker": "35", "beat": "34", "flower": "36", "sim": "33", "db": "90", "aiq": "1"}

# Run before exec'ing each child: ask the kernel to SIGTERM the child when `aiq dev` dies, even by
# SIGKILL, so no orphaned API keeps port 8000. The flag survives exec. -I -S keeps this fast and
# free of the checkout on sys.path. PR_SET_PDEATHSIG is 1.
DEATH_SIGNAL_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class Console:
    """Thread-safe line output with a padded, optionally coloured `name | ` prefix."""

    def __init__(self, stream: IO[str], colour: bool) -> None:
        self.stream = stream
        self.colour = colour
        self.lock = threading.Lock()

    def prefix(self, name: str) -> str:
        """The `name   | ` prefix, coloured when writing to a terminal."""
        label = f"{name:<{LABEL_WIDTH}} | "
        code = _COLOURS.get(name)
        return f"\033[{code}m{label}\033[0m" if self.colour and code else label

    def line(self, name: str, text: str) -> None:
        """Write one prefixed line."""
        with self.lock:
            self.stream.write(self.prefix(name) + text + "\n")
            self.stream.flush()

    def block(self, text: str, style: str = "") -> None:
        """Write several lines unprefixed (banners, walk-throughs)."""
        if self.colour and style:
            text = f"\033[{style}m{text}\033[0m"
        with self.lock:
            self.stream.write(text + "\n")
            self.stream.flush()


def use_colour(stream: IO[str]) -> bool:
    """Colour when writing to a terminal, unless NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    return bool(os.environ.get("FORCE_COLOR")) or stream.isatty()


@dataclass
class StopFlag:
    """Set by SIGINT/SIGTERM/SIGHUP; a second signal asks for an immediate kill."""

    event: threading.Event = field(default_factory=threading.Event)
    signum: int | None = None
    force: bool = False

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        """Signal handler: record the first signal, escalate on the next."""
        if self.event.is_set():
            self.force = True
        self.signum = self.signum or signum
        self.event.set()

    def install(self) -> None:
        """Route SIGINT, SIGTERM and SIGHUP here (so no KeyboardInterrupt hits a half-done step)."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self.handle)


@dataclass
class Child:
    """One supervised process and the thread copying its output."""

    name: str
    proc: subprocess.Popen[bytes]
    reader: threading.Thread


class Supervisor:
    """Start children with prefixed output; stop them (and their process groups) together."""

    def __init__(self, console: Console, env: dict[str, str], cwd: Path) -> None:
        self.console = console
        self.env = env
        self.cwd = cwd
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str]) -> Child:
        """Start `argv` in its own process group, its stdout and stderr prefixed with `name`."""
        command = list(argv)
        if sys.platform == "linux":
            command = [sys.executable, "-I", "-S", "-c", DEATH_SIGNAL_LAUNCHER, str(os.getpid()), *command]
        proc = subprocess.Popen(  # noqa: S603 - argv built by this module, no shell
            command,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Own session: the terminal's Ctrl-C reaches only `aiq dev`, which then stops the
            # children in order; killpg() on the group also reaches grandchildren.
            start_new_session=True,
        )
        reader = threading.Thread(target=self._copy, args=(name, proc), name=f"out-{name}", daemon=True)
        reader.start()
        child = Child(name, proc, reader)
        self.children.append(child)
        return child

    def _copy(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            self.console.line(name, raw.decode("utf-8", "replace").rstrip("\r\n"))
        proc.stdout.close()

    def exited(self) -> Child | None:
        """The first child that has exited, if any."""
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self, flag: StopFlag | None = None, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM every child, wait up to `timeout` (less on a second Ctrl-C), then SIGKILL groups."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                # The leader only: Celery and uvicorn stop their own pools/workers gracefully.
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(c.proc.poll() is None for c in self.children):
            if time.monotonic() > deadline or (flag is not None and flag.force):
                break
            time.sleep(0.1)
        for child in self.children:
            if child.proc.poll() is None:
                self.console.line("aiq", f"{child.name} did not stop within {timeout:.0f} s: killing it")
            # Always sweep the group: grandchildren (pool processes, reloaders) must not outlive us.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)
        for child in self.children:
            child.proc.wait()
            child.reader.join(timeout=2)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="aiq dev",
        description="Run API, worker, beat, Flower and (without OPENAI_API_KEY) the LLM simulator, "
        "on embedded PostgreSQL/Redis where DATABASE_URL/REDIS_URL are unset. Ctrl-C stops everything.",
    )
    parser.add_argument("--api-port", type=int, default=8000)
    parser.add_argument("--flower-port", type=int, default=5555)
    parser.add_argument("--sim-port", type=int, default=8900)
    parser.add_argument("--no-flower", action="store_true", help="do not start Flower")
    parser.add_argument(
        "--no-beat", action="store_true", help="do not start beat (started only when a beat_schedule exists)"
    )
    parser.add_argument("--reload", action="store_true", help="restart the API when its code changes")
    return parser.parse_args(argv)


def dev_secret(state_dir: Path) -> str:
    """A random JWT secret kept in `.aiq/dev-secret`, so tokens survive restarts of `make dev`."""
    path = state_dir / "dev-secret"
    if path.exists():
        secret = path.read_text().strip()
        if len(secret) >= 32:
            return secret
    secret = secrets.token_urlsafe(48)
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    return secret


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # SO_REUSEADDR like uvicorn: a TIME_WAIT socket from the last run is not "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - a fixed local URL
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def redact(url: str) -> str:
    """`url` with any password replaced by `***`, for printing."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def walkthrough(api: str) -> str:
    """Copy-paste shell commands that register, log in, submit a query and poll it."""
    json_header = "-H 'Content-Type: application/json'"
    creds = '{"email":"dev@example.com","password":"dev-password-123"}'
    extract = "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"{}\"])'"
    return "\n".join(
        [
            "# 1. register (a 409 on later runs just means the user exists)",
            f"curl -s -X POST {api}/api/v1/auth/register {json_header} -d '{creds}'; echo",
            "# 2. log in and keep the access token",
            f"TOKEN=$(curl -s -X POST {api}/api/v1/auth/login {json_header} -d '{creds}' | "
            + extract.format("access_token")
            + ")",
            "# 3. submit a query: 202 with its id",
            f'QID=$(curl -s -X POST {api}/api/v1/query -H "Authorization: Bearer $TOKEN" {json_header} '
            '-d \'{"query":"What is a task queue?"}\' | ' + extract.format("query_id") + ")",
            "# 4. poll until it is completed (or failed)",
            f'until curl -s {api}/api/v1/query/$QID -H "Authorization: Bearer $TOKEN" | tee /dev/stderr | '
            """grep -Eq '"status":"(completed|failed|cancelled)"'; do sleep 1; done; echo""",
        ]
    )


def _simulator_banner(sim_url: str) -> str:
    lines = [
        "OPENAI_API_KEY is not set: ANSWERS ARE SIMULATED.",
        "The worker talks to the built-in LLM simulator at",
        f"{sim_url}, not to a real model.",
        "Set OPENAI_API_KEY (and OPENAI_BASE_URL for a non-OpenAI server)",
        "before `make dev` to get real answers.",
    ]
    width = max(len(line) for line in lines)
    rule = "#" * (width + 8)
    return "\n".join([rule, *(f"##  {line:<{width}}  ##" for line in lines), rule])


class _Dev:
    """One `aiq dev` run: the steps, in order, and what they started."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = find_repo_root()
        self.state = self.root / ".aiq"
        self.console = Console(sys.stdout, use_colour(sys.stdout))
        self.flag = StopFlag()
        # Decisions (embedded servers? simulator? secret?) see `.env` like the app does; only the
        # values generated here are added to the children's environment, the rest they read themselves.
        dotenv = {k: v for k, v in dotenv_values(self.root / ".env").items() if v is not None}
        self.seen = {**dotenv, **os.environ}
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"  # children's logs appear line by line, not at exit
        self.supervisor = Supervisor(self.console, self.env, self.root)
        self.simulated = False

    def say(self, text: str) -> None:
        self.console.line("aiq", text)

    def set_default(self, key: str, value: str) -> None:
        if not self.seen.get(key):
            self.env[key] = value
            self.seen[key] = value

    def run(self) -> int:
        args = self.args
        self.flag.install()
        self.state.mkdir(exist_ok=True)
        self.set_default("ENVIRONMENT", "development")
        self.set_default("JWT_SECRET_KEY", dev_secret(self.state))
        if not self._ports_free():
            return 1

        for key, value in embedded.ensure_services(self.state, self.seen).items():
            self.set_default(key, value)
        if self.flag.event.is_set():
            return 0

        sim_url = f"http://127.0.0.1:{args.sim_port}/v1"
        if not self.seen.get("OPENAI_API_KEY"):
            self.simulated = True
            self.env["OPENAI_API_KEY"] = SIMULATOR_API_KEY
            self.env["OPENAI_BASE_URL"] = sim_url
            self.console.block(_simulator_banner(sim_url), "1;33")
            py_sim = [sys.executable, "-m", "shared.cli", "simulate", "--host", "127.0.0.1"]
            self.supervisor.start("sim", [*py_sim, "--port", str(args.sim_port)])
            if not self._wait(lambda: _port_open(args.sim_port), 30, "the simulator to listen"):
                return self._failed()

        migrate = self.supervisor.start(
            "db", [sys.executable, "-m", "alembic", "-c", str(self.root / "alembic.ini"), "upgrade", "head"]
        )
        if not self._wait(lambda: migrate.proc.poll() is not None, 300, "migrations", watch=False):
            return self._failed()
        if migrate.proc.returncode != 0:
            self.say(f"alembic upgrade head failed (exit {migrate.proc.returncode}); see the db | lines above")
            return 1
        self.supervisor.children.remove(migrate)  # finished on purpose; not a crash to watch for

        celery = [sys.executable, "-m", "celery", "-A", "worker.celery_app"]
        uvicorn = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1"]
        self.supervisor.start("api", [*uvicorn, "--port", str(args.api_port), *(["--reload"] if args.reload else [])])
        self.supervisor.start("worker", [*celery, "worker", "--loglevel", "INFO"])
        if not args.no_beat and self._has_beat_schedule():
            schedule = str(self.state / "celerybeat-schedule")  # not in the checkout's root
            self.supervisor.start("beat", [*celery, "beat", "--loglevel", "INFO", "--schedule", schedule])
        if not args.no_flower:
            self.supervisor.start("flower", [*celery, "flower", f"--port={args.flower_port}", "--address=127.0.0.1"])

        api = f"http://127.0.0.1:{args.api_port}"
        worker_health = f"http://127.0.0.1:{self._metrics_port()}/healthz"
        if self._wait(lambda: _http_ok(f"{api}/readyz"), READY_TIMEOUT, "the API's /readyz"):
            # Also let the worker finish its start-up chatter, so the summary is the last thing on screen.
            self._wait(lambda: _http_ok(worker_health), 30, "the worker's /healthz")
            self._summary(api, sim_url)
        elif self.flag.event.is_set() or self.supervisor.exited():
            return self._failed()
        else:
            self.say(f"{api}/readyz is still not OK after {READY_TIMEOUT:.0f} s; check the lines above")

        while not self.flag.event.wait(0.2):
            if self.supervisor.exited():
                return self._failed()
        return 0

    def _ports_free(self) -> bool:
        args = self.args
        wanted = {"--api-port": args.api_port}
        if not args.no_flower:
            wanted["--flower-port"] = args.flower_port
        if not self.seen.get("OPENAI_API_KEY"):
            wanted["--sim-port"] = args.sim_port
        if self._metrics_port().isdigit():
            wanted["WORKER_METRICS_PORT"] = int(self._metrics_port())
        busy = {name: port for name, port in wanted.items() if not _port_free(port)}
        for name, port in busy.items():
            self.say(f"port {port} is already in use (another `make dev`?); pick another with {name}")
        return not busy

    def _metrics_port(self) -> str:
        return self.seen.get("WORKER_METRICS_PORT") or "9540"

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str, watch: bool = True) -> bool:
        """Poll `ready()` until true; False on timeout, a stop request or (if `watch`) a dead child."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.flag.event.is_set() or (watch and self.supervisor.exited()):
                return False
            if time.monotonic() > deadline:
                self.say(f"timed out after {timeout:.0f} s waiting for {what}")
                return False
            self.flag.event.wait(0.25)
        return True

    def _failed(self) -> int:
        if self.flag.event.is_set():
            return 0  # asked to stop; not a failure
        dead = self.supervisor.exited()
        if dead is not None:
            self.say(f"{dead.name} exited unexpectedly (exit code {dead.proc.returncode}); stopping everything")
        return 1

    def _has_beat_schedule(self) -> bool:
        # Asked in a child with the same environment: importing the app here would read settings
        # from this process's environment, which lacks what was generated above.
        probe = "from worker.celery_app import app; print('yes' if app.conf.beat_schedule else 'no')"
        result = subprocess.run(  # noqa: S603 - fixed argv
            [sys.executable, "-c", probe], cwd=self.root, env=self.env, capture_output=True, text=True, timeout=60
        )
        answer = result.stdout.strip().splitlines()[-1:] if result.returncode == 0 else []
        if answer == ["yes"]:
            return True
        if result.returncode != 0:
            self.say("could not import worker.celery_app to look for a beat schedule; not starting beat")
        else:
            self.say("worker.celery_app has no beat_schedule; not starting beat")
        return False

    def _summary(self, api: str, sim_url: str) -> None:
        args = self.args
        metrics_port = self._metrics_port()
        rows = [
            ("API", api),
            ("Docs", f"{api}/docs"),
            ("Metrics", f"{api}/metrics (API), http://127.0.0.1:{metrics_port}/metrics (worker)"),
        ]
        if not args.no_flower:
            rows.append(("Flower", f"http://127.0.0.1:{args.flower_port}"))
        if self.simulated:
            rows.append(("Simulator", f"{sim_url} (calls per query: {sim_url.removesuffix('/v1')}/_sim/stats)"))
        rows += [("Database", redact(self.seen["DATABASE_URL"])), ("Redis", redact(self.seen["REDIS_URL"]))]
        table = "\n".join(f"  {name:<10} {url}" for name, url in rows)
        self.console.block(f"\nAIQ is up ({self.seen['ENVIRONMENT']}):\n{table}\n", "1;32")
        self.console.block("Try it (in another terminal):\n" + walkthrough(api) + "\n")
        if self.simulated:
            self.console.block("Answers are SIMULATED (OPENAI_API_KEY is unset).", "1;33")
        self.console.block("Ctrl-C stops everything.\n")

    def shutdown(self) -> None:
        # A second Ctrl-C from here on skips the grace period instead of interrupting the cleanup.
        self.flag.install()
        if self.flag.signum is not None:
            self.say(f"received {signal.Signals(self.flag.signum).name}; stopping (Ctrl-C again to kill now)")
        self.supervisor.stop(self.flag)
        embedded.stop_embedded()


def main(argv: Sequence[str] | None = None) -> int:
    """Run `aiq dev`; returns the exit status (0 after Ctrl-C, 1 when something failed)."""
    dev = _Dev(_parse(argv))
    try:
        return dev.run()
    except Exception as exc:  # noqa: BLE001 - report, then still stop whatever was started
        dev.say(f"error: {type(exc).__name__}: {exc}")
        return 1 if dev.flag.signum is None else 0
    finally:
        dev.shutdown()
