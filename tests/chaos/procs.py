"""Processes the harness starts: each in its own process group, logged to a file, reaped even if we die."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`, read from /proc (a Celery prefork pool's children, for instance)."""
    kids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: fields start after the last ')'.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            kids.append(int(entry.name))
    return sorted(kids)


class Reaper:
    """Talks to tests/chaos/_watchdog.py, which kills what we registered if this process dies uncleanly."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None

    def _send(self, message: dict[str, object]) -> None:
        if self._proc is None:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", str(Path(__file__).with_name("_watchdog.py")), str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
                cwd="/",
                start_new_session=True,
            )
        if self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
        except OSError:
            pass

    def add_pgid(self, pgid: int) -> None:
        self._send({"op": "pgid", "pgid": pgid})

    def forget_pgid(self, pgid: int) -> None:
        self._send({"op": "forget_pgid", "pgid": pgid})

    def add_pid(self, pid: int, comm: str) -> None:
        self._send({"op": "pid", "pid": pid, "comm": comm})

    def forget_pid(self, pid: int) -> None:
        self._send({"op": "forget_pid", "pid": pid})

    def add_tree(self, path: Path) -> None:
        self._send({"op": "rmtree", "path": str(path)})

    def disarm(self) -> None:
        if self._proc is None:
            return
        self._send({"op": "disarm"})
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)
        self._proc = None


class Proc:
    """One long-running child (API, worker, simulator, redis-server) in its own session."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        log_path: Path,
        reaper: Reaper,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.reaper = reaper
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Proc:
        self._log = self.log_path.open("ab")
        self._log.write(f"\n=== chaos harness: starting {self.name} at {time.time():.3f}\n".encode())
        self._log.flush()
        self.popen = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Own session and process group: a Ctrl-C in the terminal reaches the harness only, and a
            # kill of the group takes any grandchildren (a prefork pool) with it.
            start_new_session=True,
        )
        self.started_at = time.time()
        self.reaper.add_pgid(self.popen.pid)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group (whatever is left of it; the leader may be gone already) and reap it."""
        self.signal_group(signal.SIGKILL)
        self._reap(5)

    def _reap(self, timeout: float) -> None:
        if self.popen is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)
        self.reaper.forget_pgid(self.popen.pid)
        if self._log is not None:
            self._log.close()
            self._log = None
