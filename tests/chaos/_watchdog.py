"""The chaos harness's reaper, run as a separate script (`python -I _watchdog.py OWNER_PID`).

The harness writes one JSON line per thing it starts to this process's stdin. When the harness exits
normally it sends `disarm` first; when it dies without cleaning up (SIGKILL, OOM, `os._exit`) the kernel
closes the pipe and this process kills what was registered and removes the temp directory. It imports
nothing from the project so it works from any directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time


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
    pgids: set[int] = set()
    pids: dict[int, str] = {}  # pid -> expected /proc/<pid>/comm
    paths: list[str] = []
    for line in sys.stdin:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        op = msg.get("op")
        if op == "pgid":
            pgids.add(int(msg["pgid"]))
        elif op == "forget_pgid":
            pgids.discard(int(msg["pgid"]))
        elif op == "pid":
            pids[int(msg["pid"])] = str(msg.get("comm", ""))
        elif op == "forget_pid":
            pids.pop(int(msg["pid"]), None)
        elif op == "rmtree":
            paths.append(str(msg["path"]))
        elif op == "disarm":
            return 0
    for pgid in pgids:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
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
