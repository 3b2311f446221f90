"""Serving the simulator: uvicorn tuned for thousands of concurrent slow requests, in the foreground or a thread."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import resource
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from devkit.simulator.app import SimulatorApp, create_app
from devkit.simulator.config import SimulatorConfig

logger = logging.getLogger("aiq.simulator")

# Larger than any HTTP client's idle-connection expiry (httpx: 5 s), so the client always closes an
# idle keep-alive connection first and never reuses one the server is closing, which would surface
# as a spurious APIConnectionError.
KEEP_ALIVE_SECONDS = 75
BACKLOG = 4096


def raise_open_file_limit(wanted: int = 65536) -> int:
    """Lift the soft RLIMIT_NOFILE towards the hard limit (1,000+ open sockets need it); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            return soft
    return soft


def uvicorn_config(app: SimulatorApp, config: SimulatorConfig) -> uvicorn.Config:
    """A uvicorn config for the simulator: uvloop + httptools when available, no access log, big backlog."""
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    has_httptools = importlib.util.find_spec("httptools") is not None
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        loop="uvloop" if has_uvloop else "asyncio",
        http="httptools" if has_httptools else "h11",
        ws="none",
        lifespan="off",
        access_log=False,
        log_level=config.log_level,
        backlog=BACKLOG,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        # A hung request must not hold up Ctrl+C for `hang_seconds`.
        timeout_graceful_shutdown=1,
        server_header=False,
    )


def serve(config: SimulatorConfig) -> int:
    """Run the simulator in the foreground until interrupted; return a process exit status."""
    raise_open_file_limit()
    app = create_app(config)
    server = uvicorn.Server(uvicorn_config(app, config))
    logger.info(
        "AIQ LLM simulator on http://%s:%s/v1 (latency %sms +/- %sms, faults 429=%s 500=%s hang=%s drop=%s quota=%s%s)",
        config.host,
        config.port,
        config.latency_ms,
        config.latency_jitter_ms,
        config.rate_429,
        config.rate_500,
        config.rate_hang,
        config.rate_drop,
        config.rate_quota,
        ", API key required" if config.api_key else "",
    )
    try:
        server.run()
    except SystemExit as exc:
        # uvicorn exits the process when it cannot bind; report it as a status instead.
        return exc.code if isinstance(exc.code, int) else 1
    return 0 if server.started else 1


@dataclass
class RunningSimulator:
    """A simulator served from a background thread (see `run_in_thread`)."""

    app: SimulatorApp
    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        """Root URL, e.g. `http://127.0.0.1:41234`."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What to pass as the openai SDK's `base_url`."""
        return self.url + "/v1"


@contextlib.contextmanager
def run_in_thread(config: SimulatorConfig | None = None, startup_timeout: float = 10.0) -> Iterator[RunningSimulator]:
    """Serve a simulator from a daemon thread for the duration of the block (port 0 picks a free port)."""
    config = config if config is not None else SimulatorConfig(port=0, latency_ms=0)
    app = create_app(config)
    server = uvicorn.Server(uvicorn_config(app, config))
    # Binding here, before the thread starts, makes port 0 race-free and tells us the real port.
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="aiq-simulator", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("simulator failed to start")
        time.sleep(0.01)
    try:
        yield RunningSimulator(app=app, server=server, thread=thread, host=config.host, port=port)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
