"""`aiq dev` (`make dev`): the whole service on one machine, with nothing installed by hand.

Embedded PostgreSQL/Redis where DATABASE_URL/REDIS_URL are unset, the LLM simulator where
OPENAI_API_KEY is unset, migrations, then API, worker and Flower as child processes sharing one
environment, their output prefixed by name; with `--monitoring`, the machine's Prometheus scraping them
with the repo's alert rules. Every port binds 127.0.0.1 (the embedded servers use unix sockets). Ctrl-C
stops everything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values

from devkit import embedded
from devkit.migrations import migrate
from devkit.paths import find_repo_root
from devkit.procs import Launcher, StopFlag

LABEL_WIDTH = 6
STOP_TIMEOUT = 10.0
READY_TIMEOUT = 90.0
SIMULATOR_API_KEY = "sk-aiq-dev-simulator"  # the simulator accepts any key; the SDK insists on one
_COLOURS = {"api": "32", "worker": "35", "flower": "36", "sim": "33", "prom": "34", "aiq": "1"}
SCRAPE_INTERVAL = "5s"  # a dev dashboard should move while you watch it


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


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="aiq dev",
        description="Run API, worker, Flower and (without OPENAI_API_KEY) the LLM simulator, "
        "on embedded PostgreSQL/Redis where DATABASE_URL/REDIS_URL are unset. Ctrl-C stops everything.",
    )
    parser.add_argument("--api-port", type=int, default=8000)
    parser.add_argument("--flower-port", type=int, default=5555)
    parser.add_argument("--sim-port", type=int, default=8900)
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--no-flower", action="store_true", help="do not start Flower")
    parser.add_argument(
        "--monitoring",
        action="store_true",
        help="also start the machine's Prometheus (`make tools` installs it) on the dev processes, with the "
        "repo's alert rules",
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
    """Copy-paste shell commands that register, log in (keeping both tokens), submit a query and poll it."""
    json_header = "-H 'Content-Type: application/json'"
    creds = '{"email":"dev@example.com","password":"dev-password-123"}'
    extract = "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"{}\"])'"
    return "\n".join(
        [
            "# 1. register (a 409 on later runs just means the user exists)",
            f"curl -s -X POST {api}/api/v1/auth/register {json_header} -d '{creds}'; echo",
            "# 2. log in and keep the access and refresh tokens",
            f"LOGIN=$(curl -s -X POST {api}/api/v1/auth/login {json_header} -d '{creds}')",
            'TOKEN=$(echo "$LOGIN" | ' + extract.format("access_token") + ")",
            'REFRESH=$(echo "$LOGIN" | ' + extract.format("refresh_token") + ")",
            "# 3. submit a query: 202 with its id",
            f'QID=$(curl -s -X POST {api}/api/v1/query -H "Authorization: Bearer $TOKEN" {json_header} '
            '-d \'{"query":"What is a task queue?"}\' | ' + extract.format("query_id") + ")",
            "# 4. poll until it is completed (or failed)",
            f'until curl -s {api}/api/v1/query/$QID -H "Authorization: Bearer $TOKEN" | tee /dev/stderr | '
            """grep -Eq '"status":"(completed|failed|cancelled)"'; do sleep 1; done; echo""",
            "# more (refresh, cancel, the simulator's [[sim fail=...]] faults, Flower): README.md, API walk-through",
        ]
    )


def prometheus_config(api_target: str, worker_target: str, rules: Path) -> str:
    """A Prometheus configuration scraping one API and one worker on this machine, with AIQ's alert rules.

    Job names match monitoring/prometheus.yml, so the rules and the Grafana dashboard work unchanged. JSON is
    valid YAML: no YAML writer needed.
    """
    config = {
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "evaluation_interval": SCRAPE_INTERVAL,
            "external_labels": {"stack": "aiq-dev"},
        },
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": "aiq-api", "metrics_path": "/metrics", "static_configs": [{"targets": [api_target]}]},
            {"job_name": "aiq-worker", "metrics_path": "/metrics", "static_configs": [{"targets": [worker_target]}]},
        ],
    }
    return json.dumps(config, indent=2) + "\n"


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
        self.launcher = Launcher(echo=self.console.line, cwd=self.root)
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
        # Containers need the metrics servers on every interface; a developer's machine does not.
        self.set_default("WORKER_METRICS_HOST", "127.0.0.1")
        self.set_default("API_METRICS_HOST", "127.0.0.1")
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
            py_sim = [sys.executable, "-m", "devkit.simulator", "--host", "127.0.0.1"]
            self.launcher.start("sim", [*py_sim, "--port", str(args.sim_port)], self.env)
            if not self._wait(lambda: _port_open(args.sim_port), 30, "the simulator to listen"):
                return self._failed()

        self.say("applying migrations (alembic upgrade head)")
        migrate(self.seen["DATABASE_URL"], verbose=True)
        if self.flag.event.is_set():
            return 0

        celery = [sys.executable, "-m", "celery", "-A", "worker.celery_app"]
        uvicorn = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1"]
        reload = ["--reload"] if args.reload else []
        self.launcher.start("api", [*uvicorn, "--port", str(args.api_port), *reload], self.env)
        self.launcher.start("worker", [*celery, "worker", "--loglevel", "INFO"], self.env)
        if not args.no_flower:
            flower = [*celery, "flower", f"--port={args.flower_port}", "--address=127.0.0.1"]
            self.launcher.start("flower", flower, self.env)
        if args.monitoring:
            self._start_prometheus()

        api = f"http://127.0.0.1:{args.api_port}"
        worker_health = f"http://127.0.0.1:{self._metrics_port()}/healthz"
        if self._wait(lambda: _http_ok(f"{api}/readyz"), READY_TIMEOUT, "the API's /readyz"):
            # Also let the worker finish its start-up chatter, so the summary is the last thing on screen.
            self._wait(lambda: _http_ok(worker_health), 30, "the worker's /healthz")
            self._summary(api, sim_url)
        elif self.flag.event.is_set() or self.launcher.exited():
            return self._failed()
        else:
            self.say(f"{api}/readyz is still not OK after {READY_TIMEOUT:.0f} s; check the lines above")

        while not self.flag.event.wait(0.2):
            if self.launcher.exited():
                return self._failed()
        return 0

    def _ports_free(self) -> bool:
        args = self.args
        wanted = {"--api-port": args.api_port}
        if not args.no_flower:
            wanted["--flower-port"] = args.flower_port
        if not self.seen.get("OPENAI_API_KEY"):
            wanted["--sim-port"] = args.sim_port
        if args.monitoring:
            wanted["--prometheus-port"] = args.prometheus_port
        if self._metrics_port().isdigit():
            wanted["WORKER_METRICS_PORT"] = int(self._metrics_port())
        if self._api_metrics_port().isdigit():
            wanted["API_METRICS_PORT"] = int(self._api_metrics_port())
        busy = {name: port for name, port in wanted.items() if not _port_free(port)}
        for name, port in busy.items():
            self.say(f"port {port} is already in use (another `make dev`?); pick another with {name}")
        return not busy

    def _start_prometheus(self) -> None:
        """The machine's Prometheus on the dev processes; without one, say how to get it and carry on."""
        binary = shutil.which("prometheus")
        if binary is None:
            self.say("--monitoring: no `prometheus` on PATH (on Debian/Ubuntu `make tools` installs it); skipped")
            self.args.monitoring = False
            return
        home = self.state / "prometheus"
        (home / "data").mkdir(parents=True, exist_ok=True)
        config = home / "prometheus.yml"
        config.write_text(
            prometheus_config(
                f"127.0.0.1:{self._api_metrics_port()}",
                f"127.0.0.1:{self._metrics_port()}",
                self.root / "monitoring" / "alerts.yml",
            )
        )
        argv = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={home / 'data'}",
            "--storage.tsdb.retention.time=2d",
            f"--web.listen-address=127.0.0.1:{self.args.prometheus_port}",
            "--log.level=warn",
        ]
        self.launcher.start("prom", argv, self.env)

    def _metrics_port(self) -> str:
        return self.seen.get("WORKER_METRICS_PORT") or "9540"

    def _api_metrics_port(self) -> str:
        return self.seen.get("API_METRICS_PORT") or "9541"

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> bool:
        """Poll `ready()` until true; False on timeout, a stop request or a dead child."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.flag.event.is_set() or self.launcher.exited():
                return False
            if time.monotonic() > deadline:
                self.say(f"timed out after {timeout:.0f} s waiting for {what}")
                return False
            self.flag.event.wait(0.25)
        return True

    def _failed(self) -> int:
        if self.flag.event.is_set():
            return 0  # asked to stop; not a failure
        dead = self.launcher.exited()
        if dead is not None:
            self.say(f"{dead.name} exited unexpectedly (exit code {dead.popen.returncode}); stopping everything")
        return 1

    def _summary(self, api: str, sim_url: str) -> None:
        args = self.args
        metrics_port = self._metrics_port()
        rows = [
            ("API", api),
            ("Docs", f"{api}/docs"),
            (
                "Metrics",
                f"http://127.0.0.1:{self._api_metrics_port()}/metrics (API), "
                f"http://127.0.0.1:{metrics_port}/metrics (worker)",
            ),
        ]
        if not args.no_flower:
            rows.append(("Flower", f"http://127.0.0.1:{args.flower_port}"))
        if args.monitoring:
            prom = f"http://127.0.0.1:{args.prometheus_port}"
            rows.append(("Prometheus", f"{prom}/alerts (rules), {prom}/targets, {prom}/graph"))
            rows.append(("Dashboard", "monitoring/grafana/dashboards/aiq.json: import into any Grafana"))
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
        for proc in self.launcher.stop_all(STOP_TIMEOUT, abort=lambda: self.flag.force):
            self.say(f"{proc.name} did not stop within {STOP_TIMEOUT:.0f} s: killed it")
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
