"""The FastAPI app: `uvicorn api.main:app`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.compat import COMPAT_TAG_METADATA
from api.compat import router as compat
from api.compat.errors import COMPAT_PREFIX
from api.deps import Handles
from api.docs import install_docs
from api.errors import install_error_handlers
from api.metrics_server import MetricsServer
from api.middleware import EdgeMiddleware
from api.openapi import install_openapi
from api.routes import admin, auth, events, health, keys, limits, queries, usage, webhooks
from shared.config import Settings, get_settings
from shared.db import make_engine, make_raw_pool, make_redis, make_sessionmaker
from shared.events import EventLog
from shared.logging import configure_logging
from shared.metrics import QueueStats, register_queue_collector, unregister_collector
from shared.process import freeze_startup_heap, thaw_startup_heap
from shared.queue import Publisher
from shared.wakeup import Wakeup

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; its engines and clients are made in the lifespan and reach routes only via `api.deps`."""
    settings = settings or get_settings()
    configure_logging("aiq-api", settings.log_level)
    if settings.uses_development_jwt_key:
        log.warning("JWT_SECRET_KEY is weak or unset: tokens are signed with the INSECURE development key")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings, "aiq-api")
        app.state.sessionmaker = make_sessionmaker(engine)
        app.state.autocommit_sessionmaker = make_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"))
        raw_pool = await make_raw_pool(settings, "aiq-api")
        redis = make_redis(settings)
        # ONE subscriber per process wakes every waiting SSE stream and long-poll (shared/wakeup.py).
        wakeup = Wakeup(settings)
        wakeup.start()
        stats = QueueStats()
        handles = app.state.handles = Handles(
            settings=settings,
            pool=raw_pool,
            redis=redis,
            publisher=Publisher(settings),
            events=EventLog(redis, settings),
            wakeup=wakeup,
            queue_stats=stats,
        )
        collector = register_queue_collector(
            lambda: stats.depth,
            lambda: stats.oldest_pending_age,
            lambda: stats.counts,
            queue=settings.queue_name,
            users_waiting_fn=lambda: stats.users_waiting,
        )
        metrics_server = None
        if settings.api_metrics_port:
            metrics_server = MetricsServer(app, settings.api_metrics_host, settings.api_metrics_port)
            await metrics_server.start()
        freeze_startup_heap()
        try:
            yield
        finally:
            thaw_startup_heap()
            if metrics_server is not None:
                await metrics_server.stop()
            unregister_collector(collector)
            await wakeup.stop()
            await handles.publisher.aclose()
            await raw_pool.close()
            await redis.aclose()
            await engine.dispose()

    app = FastAPI(
        title="AIQ",
        version="0.1.0",
        description="Queue-backed AI queries: submit, get an id at once, poll for the answer.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_tags=[COMPAT_TAG_METADATA],
    )
    install_error_handlers(app)
    install_docs(app)
    # Every route straight in the app's own list (the routers are declared with their full paths). FastAPI's
    # `include_router` keeps a router as a branch matched lazily: each request walks every branch before its
    # own, twice (match, then handle), ~0.3 ms of CPU on the test machine for a route at the end of the list.
    v1 = [auth.router, queries.router, events.router, keys.router, admin.router, usage.router, limits.router]
    for router in [*v1, webhooks.router, webhooks.deliveries, *compat.routers, health.router]:
        app.router.routes.extend(router.routes)
    install_openapi(app)
    # The request id is set before metrics and handlers run; the body limit answers before any parser; every
    # answer, the limit's own and an unhandled error's 500 included, gets the security headers.
    # A batch file upload is a multipart form: the file plus room for the form's own parts.
    uploads = {f"{COMPAT_PREFIX}/files": settings.max_file_bytes + 64 * 1024}
    app.add_middleware(EdgeMiddleware, max_bytes=settings.max_body_bytes, uploads=uploads)
    return app


app = create_app()
