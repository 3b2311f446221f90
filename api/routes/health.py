"""Liveness and readiness (public port); metrics (`metrics_router`, served on API_METRICS_PORT only)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import AutocommitSessionDep, QueueStatsDep, RedisDep, SettingsDep
from shared.metrics import render_metrics
from shared.repositories import queries_session

router = APIRouter(tags=["operations"])
# Not part of the public app: api/metrics_server.py serves it on its own port.
metrics_router = APIRouter()
log = logging.getLogger(__name__)
CHECK_TIMEOUT_SECONDS = 2.0


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


async def _ok(check: Awaitable[object]) -> bool:
    try:
        await asyncio.wait_for(check, CHECK_TIMEOUT_SECONDS)
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        return False
    return True


@router.get(
    "/readyz",
    summary="Readiness",
    responses={503: {"description": "The database or the broker is unreachable (same body, status `unavailable`)"}},
)
async def readyz(session: AutocommitSessionDep, redis: RedisDep) -> JSONResponse:
    """Database and broker both reachable."""
    # The session connects on its first statement, inside the guard: a dead database means "down", not 503.
    database, broker = await asyncio.gather(_ok(session.execute(text("SELECT 1"))), _ok(redis.ping()))
    checks = {"database": "ok" if database else "down", "broker": "ok" if broker else "down"}
    ready = database and broker
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


@metrics_router.get("/metrics", include_in_schema=False)
async def metrics(
    session: AutocommitSessionDep, redis: RedisDep, settings: SettingsDep, stats: QueueStatsDep
) -> Response:
    """Prometheus exposition, with queue depth and the oldest pending age read at scrape time."""

    async def from_database() -> None:
        stats.counts, stats.oldest_pending_age = await queries_session.live_stats(session)
        stats.users_waiting = await queries_session.users_with_queued_work(session)

    async def from_broker() -> None:
        stats.depth = int(await redis.llen(settings.queue_name))

    await asyncio.gather(_ok(from_database()), _ok(from_broker()))
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)
