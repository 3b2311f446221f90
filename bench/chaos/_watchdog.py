"""The chaos harness's reaper: `Reaper` in the harness, this file as a script (`python -I _watchdog.py OWNER_PID`).

The launcher's children die with the harness by themselves; what does not is PostgreSQL (pg_ctl starts it
as a daemon) and the temp directory. The harness writes one JSON line per such thing to this process's
stdin. When the harness exits normally it sends `disarm` first; when it dies without cleaning up
(SIGKILL, OOM, `os._exit`) the kernel closes the pipe and this process stops what was registered and
removes the temp directory. As a script it imports nothing from the project, so it works from any
directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


class Reaper:
    """The harness's side: starts the watchdog on first use and tells it what to clean up."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None

    def _send(self, message: dict[str, object]) -> None:
        if self._proc is None:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", str(Path(__file__).resolve()), str(os.getpid())],
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

    def add_pid(self, pid: int, comm: str) -> None:
        """Stop `pid` (if it still runs `comm`) should the harness die."""
        self._send({"op": "pid", "pid": pid, "comm": comm})

    def forget_pid(self, pid: int) -> None:
        self._send({"op": "forget_pid", "pid": pid})

    def add_tree(self, path: Path) -> None:
        """Remove `path` should the harness die."""
        self._send({"op": "rmtree", "path": str(path)})

    def disarm(self) -> None:
        """The harness cleaned up itself: let the watchdog exit without touching anything."""
        if self._proc is None:
            return
        self._send({"op": "disarm"})
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)
        self._proc = None


def _comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _runs(pid: int, comm: str) -> bool:
    """`pid` is alive and runs the expected program (any when `comm` is empty), so it is not a reused pid."""
    current = _comm(pid)
    return current is not None and (not comm or current == comm)


def main() -> int:
    # Ctrl-C for the terminal's process group is the owner's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pids: dict[int, str] = {}  # pid -> expected /proc/<pid>/comm
    paths: list[str] = []
    for line in sys.stdin:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        op = msg.get("op")
        if op == "pid":
            pids[int(msg["pid"])] = str(msg.get("comm", ""))
        elif op == "forget_pid":
            pids.pop(int(msg["pid"]), None)
        elif op == "rmtree":
            paths.append(str(msg["path"]))
        elif op == "disarm":
            return 0
    # Only pids that still run the expected program: anything else is a reused pid.
    pids = {pid: comm for pid, comm in pids.items() if _runs(pid, comm)}
    for pid in pids:
        # SIGQUIT is PostgreSQL's immediate shutdown; it also stops its backends.
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGQUIT)
    deadline = time.monotonic() + 10
    while any(_comm(p) is not None for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, comm in pids.items():
        if _runs(pid, comm):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
