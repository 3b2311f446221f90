"""Child processes of `aiq dev`, the tests, the bench and the chaos harness: one way to start and stop them.

Every child runs in its own session, so a terminal's Ctrl-C reaches only the parent (which then stops
its children in order) and a kill of the child's process group also reaches its grandchildren (a
Celery pool, uvicorn's workers). On Linux the kernel also SIGTERMs a child when the thread that started
it dies, even by SIGKILL, so no orphan keeps a port or consumes a queue: start children from the main
thread or another thread that lives as long as they should.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import psutil

from devkit.paths import ROOT

STOP_TIMEOUT = 15.0
# First characters of the line written to a child's log before it starts (a log may hold several runs).
START_MARK = "=== start"

# Run before exec'ing each child: ask the kernel for SIGTERM when the parent dies (PR_SET_PDEATHSIG is
# 1). The flag survives exec. -I -S keeps this fast and free of the checkout on sys.path.
_DEATH_SIGNAL = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


# Ports free_port has handed out lately, one empty file each, shared by every process of this user.
_PORT_CLAIMS = Path(tempfile.gettempdir()) / f"aiq-ports-{os.getuid()}"
_PORT_CLAIM_SECONDS = 600.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now and that no free_port on this machine has
    handed out in the last ten minutes.

    The kernel hands a just-closed port out again within a few calls, so between this call and the caller's
    bind another process (another pytest-xdist worker, a second bench) could be given the same one; the
    caller's server would then fail to bind while its readiness check talked to the other's. A claim file
    per port, created exclusively, keeps the hand-outs apart across processes.
    """
    _PORT_CLAIMS.mkdir(mode=0o700, exist_ok=True)
    for _ in range(256):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if _claim_port(_PORT_CLAIMS / str(port)):
            return port
    raise RuntimeError(f"no unclaimed free port found (claims in {_PORT_CLAIMS})")


def _claim_port(path: Path) -> bool:
    """Create the port's claim file; an older claim than _PORT_CLAIM_SECONDS is stale and taken over."""
    for _ in range(2):
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return True
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - path.stat().st_mtime < _PORT_CLAIM_SECONDS:
                    return False
                path.unlink()
    return False


@dataclass(eq=False)
class Proc:
    """A started child, where its output goes, and views of its process tree."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path | None
    started_at: float  # wall clock, just after the start
    reader: threading.Thread | None = None  # copies the output to `echo`, when there is one

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        """True until the child has exited."""
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the child's whole process group (whatever is left of it)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group at once, as a crash would, and reap the child."""
        self.signal_group(signal.SIGKILL)
        self._reap()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL for the whole group when the child is not gone within `timeout`."""
        stop([self], timeout)

    def _reap(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        if self.reader is not None:
            self.reader.join(timeout=2)

    def tree(self) -> list[psutil.Process]:
        """The child and all its descendants (empty once it is gone)."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def child_pids(self) -> list[int]:
        """Pids of the child's descendants (a prefork pool, uvicorn's workers)."""
        return [p.pid for p in self.tree()[1:]]

    def rss_mb(self) -> float:
        """Resident memory of the whole tree, in MiB."""
        total = 0
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total / 2**20


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
    log: Path | None = None,
    echo: Callable[[str], None] | None = None,
) -> Proc:
    """Start `argv`; its output is appended to `log`, else handed line by line to `echo`, else dropped."""
    command = list(argv)
    if sys.platform == "linux":
        command = [sys.executable, "-I", "-S", "-c", _DEATH_SIGNAL, str(os.getpid()), *command]
    out = log.open("ab") if log is not None else None
    try:
        if out is not None:
            out.write(f"\n{START_MARK} {name} at {time.time():.3f}\n".encode())
            out.flush()
        popen = subprocess.Popen(  # noqa: S603 - argv from the callers in this repository, no shell
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out or (subprocess.PIPE if echo is not None else subprocess.DEVNULL),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if out is not None:
            out.close()
    proc = Proc(name, popen, log, time.time())
    if echo is not None and log is None:
        proc.reader = threading.Thread(target=_copy, args=(popen, echo), name=f"out-{name}", daemon=True)
        proc.reader.start()
    return proc


def _copy(popen: subprocess.Popen[bytes], echo: Callable[[str], None]) -> None:
    assert popen.stdout is not None
    for raw in iter(popen.stdout.readline, b""):
        echo(raw.decode("utf-8", "replace").rstrip("\r\n"))
    popen.stdout.close()


def stop(procs: Sequence[Proc], timeout: float = STOP_TIMEOUT, abort: Callable[[], bool] | None = None) -> list[Proc]:
    """SIGTERM each child in order, wait up to `timeout` (or until `abort()`), then SIGKILL every group.

    Returns the children that were still running when the wait ended.
    """
    for proc in procs:
        if proc.alive():
            # The leader only: uvicorn and Celery stop their own workers and pools gracefully.
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(p.alive() for p in procs) and time.monotonic() < deadline and not (abort and abort()):
        time.sleep(0.1)
    stubborn = [p for p in procs if p.alive()]
    for proc in procs:
        # Always sweep the group: grandchildren (pool processes, reloaders) must not outlive the parent.
        proc.signal_group(signal.SIGKILL)
    for proc in procs:
        proc._reap()
    return stubborn


class Launcher:
    """Starts children with one output rule and working directory, and stops those still tracked together."""

    def __init__(
        self, logdir: Path | None = None, *, echo: Callable[[str, str], None] | None = None, cwd: Path = ROOT
    ) -> None:
        """Output goes to `logdir/<name>.log`, else to `echo(name, line)`."""
        self.logdir = logdir
        self.echo = echo
        self.cwd = cwd
        self.procs: list[Proc] = []

    def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, *, log: Path | None = None
    ) -> Proc:
        """Start and track `argv`; `log` overrides the launcher's `<logdir>/<name>.log`."""
        if log is None and self.logdir is not None:
            log = self.logdir / f"{name}.log"
        echo = functools.partial(self.echo, name) if self.echo is not None else None
        proc = spawn(name, argv, env=env, cwd=self.cwd, log=log, echo=echo)
        self.procs.append(proc)
        return proc

    def exited(self) -> Proc | None:
        """The first tracked child that has exited, if any."""
        return next((p for p in self.procs if not p.alive()), None)

    def forget(self, proc: Proc) -> None:
        """Stop tracking `proc` (killed or replaced), so stopping the others leaves its process group alone."""
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_group(
        self, procs: Iterable[Proc], timeout: float = STOP_TIMEOUT, abort: Callable[[], bool] | None = None
    ) -> list[Proc]:
        """`stop()` these children together and forget them; returns those that had to be killed."""
        chosen = list(procs)
        try:
            return stop(chosen, timeout, abort)
        finally:
            for proc in chosen:
                self.forget(proc)

    def stop_all(self, timeout: float = STOP_TIMEOUT, abort: Callable[[], bool] | None = None) -> list[Proc]:
        """Stop every tracked child, the last started first."""
        return self.stop_group(reversed(self.procs), timeout, abort)


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

    def wait(self) -> int:
        """Block until a signal arrives; return its number."""
        while not self.event.wait(1.0):  # a timed wait keeps the main thread responsive to signals
            pass
        assert self.signum is not None
        return self.signum
