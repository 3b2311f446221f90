"""Processes of a benchmark run: servers, throwaway databases, the simulator, APIs and workers.

Everything runs as a real process on this machine, started the way production starts it (the
Dockerfiles' commands), and is measured from the outside with psutil: CPU seconds and RSS of each
process tree, so a run can say which process used the cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from devkit import embedded
from devkit.procs import Proc

PY = sys.executable
SIM_API_KEY = "sk-bench-simulator-key-0123456789"


def pg(url: str) -> Any:
    """An autocommit psycopg2 connection (any SQLAlchemy spelling of the URL)."""
    import psycopg2

    conn = psycopg2.connect(embedded.libpq_url(url))
    conn.autocommit = True
    return conn


def http_json(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 10
) -> Any:
    """A tiny stdlib HTTP client for setup and control calls (not for load)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def wait_http(url: str, proc: Proc | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@dataclass
class Servers:
    """PostgreSQL and Redis as `make test` finds them: TEST_* variables, else embedded."""

    database: str
    redis: str
    embedded: bool
    created: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, base: Path) -> Servers:
        db = os.environ.get("TEST_DATABASE_URL")
        redis = os.environ.get("TEST_REDIS_URL")
        is_embedded = not (db and redis)
        db = db or embedded.start_postgres(base / "svc")
        redis = redis or embedded.start_redis(base / "svc")
        return cls(db, redis, is_embedded)

    def new_database(self, prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        url = embedded.create_database(self.database, name)
        self.created.append(name)
        return url

    def drop_all(self) -> None:
        for name in self.created:
            with contextlib.suppress(Exception):
                embedded.drop_database(self.database, name)
        self.created.clear()

    def max_connections(self) -> int:
        with contextlib.closing(pg(self.database)) as conn, conn.cursor() as cur:
            cur.execute("SHOW max_connections")
            return int(cur.fetchone()[0])


def server_processes(databases: tuple[str, ...] = ()) -> dict[str, list[psutil.Process]]:
    """PostgreSQL and Redis processes on this machine (all of them: the embedded ones and any machine server).

    With `databases`, only the PostgreSQL backends connected to one of them (their process title names the
    database), so other people's work on a shared server stays out of the figures.
    """
    found: dict[str, list[psutil.Process]] = {"postgres": [], "redis": []}
    for p in psutil.process_iter(["name", "cmdline"]):
        name = p.info["name"] or ""
        if name in ("postgres", "postmaster"):
            title = " ".join(p.info["cmdline"] or [])
            if not databases or any(f" {db} " in title for db in databases):
                found["postgres"].append(p)
        elif name.startswith("redis-server"):
            found["redis"].append(p)
    return found


class CpuMeter:
    """CPU seconds per role (a role is a set of process trees), and the whole machine's busy time."""

    def __init__(self, roles: dict[str, Iterable[Proc]], databases: tuple[str, ...] = ()) -> None:
        self.roles = {role: list(procs) for role, procs in roles.items()}
        self.databases = databases

    def _processes(self) -> dict[str, list[psutil.Process]]:
        out: dict[str, list[psutil.Process]] = {}
        for role, procs in self.roles.items():
            out[role] = [p for proc in procs for p in proc.tree()]
        out.update(server_processes(self.databases))
        with contextlib.suppress(psutil.Error):
            out["harness"] = [psutil.Process(os.getpid())]
        return out

    def snapshot(self) -> dict[str, Any]:
        per: dict[str, dict[tuple[int, float], float]] = {}
        for role, ps in self._processes().items():
            seen: dict[tuple[int, float], float] = {}
            for p in ps:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    seen[(p.pid, p.create_time())] = t.user + t.system
            per[role] = seen
        sys_t = psutil.cpu_times()
        busy = sum(sys_t) - sys_t.idle - getattr(sys_t, "iowait", 0.0)
        return {"t": time.monotonic(), "roles": per, "busy": busy}

    @staticmethod
    def delta(
        before: dict[str, Any], after: dict[str, Any], extra_cpu_s: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """CPU seconds per role between two snapshots, in % of one core too.

        `other` is the machine's busy time that no process of this run accounts for: other people's
        work on a shared machine, plus the kernel's own. A high `other` means the figures are
        pessimistic.
        """
        wall = max(1e-9, after["t"] - before["t"])
        roles: dict[str, float] = {}
        busiest: dict[str, float] = {}
        for role, procs in after["roles"].items():
            old = before["roles"].get(role, {})
            per = [max(0.0, v - old.get(k, 0.0)) for k, v in procs.items()]
            roles[role] = round(sum(per), 3)
            busiest[role] = round(100 * max(per, default=0.0) / wall, 1)
        roles.update(extra_cpu_s or {})
        busy_s = after["busy"] - before["busy"]
        roles["other"] = round(max(0.0, busy_s - sum(roles.values())), 3)
        return {
            "wall_s": round(wall, 3),
            "cpu_s": roles,
            "pct_of_core": {r: round(100 * v / wall, 1) for r, v in roles.items()},
            # The busiest single process of each role: one at ~100 % is a GIL-bound process at its limit.
            "busiest_process_pct": busiest,
            "machine_busy_pct": round(100 * busy_s / wall / (psutil.cpu_count() or 1), 1),
        }


def machine_busy_pct(seconds: float) -> float:
    """How busy the whole machine is over `seconds`, in % of all cores."""
    return float(psutil.cpu_percent(interval=seconds))


def busiest_processes(seconds: float = 1.0, top: int = 5) -> list[tuple[str, float]]:
    """The processes using the most CPU right now (to name what else runs on a shared machine)."""
    procs = list(psutil.process_iter(["cmdline", "name"]))
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(seconds)
    usage = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])[:100]
            usage.append((cmd, p.cpu_percent(None)))
    return sorted(usage, key=lambda u: -u[1])[:top]


def new_secret() -> str:
    return secrets.token_urlsafe(48)
