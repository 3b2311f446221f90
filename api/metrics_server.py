"""The API's Prometheus `/metrics` on a port of its own (API_METRICS_PORT), never on the public port.

A second uvicorn server runs in the API process' event loop and shares the app's state (database pools,
Redis, queue stats), so a scrape reads live queue figures exactly as before. The socket is opened with
SO_REUSEPORT: with `uvicorn --workers N` every worker process binds the same port and any of them answers;
set PROMETHEUS_MULTIPROC_DIR then, so that each answer aggregates all processes (shared/metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from api.routes.health import metrics_router

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to the process' main server (it is stopped by the lifespan)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class MetricsServer:
    """Start with `await start()`, stop with `await stop()`; `port` is the bound port."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        metrics_app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        # The same State object: api/deps.py reads pools and clients from `request.app.state`.
        metrics_app.state = app.state
        metrics_app.include_router(metrics_router)
        config = uvicorn.Config(metrics_app, lifespan="off", access_log=False, log_config=None)
        self._server = _EmbeddedServer(config)
        self._socket = _socket(host, port)
        self.port: int = self._socket.getsockname()[1]
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="aiq-api-metrics")
        while not self._server.started and not self._task.done():  # noqa: ASYNC110 - uvicorn has only a flag
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # re-raise why it could not start
        log.info("metrics server listening", extra={"port": self.port})

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._socket.close()
