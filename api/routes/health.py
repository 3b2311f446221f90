"""Liveness and readiness (public port); metrics (`metrics_router`, served on API_METRICS_PORT only)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import AutocommitSessionDep, HandlesDep
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
    responses={
        503: {
            "description": "The database, the broker or (with RabbitMQ as the broker) Redis is unreachable "
            "(same body, status `unavailable`)"
        }
    },
)
async def readyz(session: AutocommitSessionDep, handles: HandlesDep) -> JSONResponse:
    """Database and the configured broker reachable (and Redis, when it is not the broker)."""
    # The session connects on its first statement, inside the guard: a dead database means "down", not 503.
    probes: dict[str, Awaitable[object]] = {
        "database": session.execute(text("SELECT 1")),
        "broker": handles.publisher.ping(),
    }
    if handles.settings.broker_is_amqp:
        # Limits, revocation and throttles live in Redis whatever the broker.
        probes["redis"] = handles.redis.ping()
    results = await asyncio.gather(*(_ok(p) for p in probes.values()))
    checks = {name: "ok" if ok else "down" for name, ok in zip(probes, results, strict=True)}
    ready = all(results)
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


@metrics_router.get("/metrics", include_in_schema=False)
async def metrics(session: AutocommitSessionDep, handles: HandlesDep) -> Response:
    """Prometheus exposition, with queue depth and the oldest pending age read at scrape time."""
    stats = handles.queue_stats

    async def from_database() -> None:
        stats.counts, stats.oldest_pending_age = await queries_session.live_stats(session)
        stats.users_waiting = await queries_session.users_with_queued_work(session)

    async def from_broker() -> None:
        stats.depth = await handles.publisher.depth()

    await asyncio.gather(_ok(from_database()), _ok(from_broker()))
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)
