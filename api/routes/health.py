"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from shared.metrics import render_metrics
from shared.repositories import queries as queries_repo

router = APIRouter(tags=["operations"])
log = logging.getLogger(__name__)
CHECK_TIMEOUT_SECONDS = 2.0


@dataclass
class QueueStats:
    """Refreshed at each scrape, read by the Prometheus collector."""

    depth: int = 0
    oldest_pending_age: float | None = None
    counts: dict[str, int] = field(default_factory=dict)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


async def _ok(check: Awaitable[object]) -> bool:
    try:
        await asyncio.wait_for(check, CHECK_TIMEOUT_SECONDS)
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        return False
    return True


async def _ping_database(request: Request) -> None:
    async with request.app.state.engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Database and broker both reachable."""
    database, broker = await asyncio.gather(_ok(_ping_database(request)), _ok(request.app.state.redis.ping()))
    checks = {"database": "ok" if database else "down", "broker": "ok" if broker else "down"}
    ready = database and broker
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


async def _refresh_queue_stats(request: Request) -> None:
    stats: QueueStats = request.app.state.queue_stats

    async def from_database() -> None:
        async with request.app.state.sessionmaker() as session:
            stats.counts, stats.oldest_pending_age = await queries_repo.live_stats(session)

    async def from_broker() -> None:
        stats.depth = int(await request.app.state.redis.llen(request.app.state.settings.queue_name))

    await asyncio.gather(_ok(from_database()), _ok(from_broker()))


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus exposition, with queue depth and the oldest pending age read at scrape time."""
    await _refresh_queue_stats(request)
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)
