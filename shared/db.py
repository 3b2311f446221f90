"""Engines and sessions, and the process's Redis client, built once per process (never at import time)."""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import asyncpg
import redis.asyncio as aioredis
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from shared.config import Settings

T = TypeVar("T")

# What a database restart or overload looks like from asyncpg and SQLAlchemy: the connection dies, the
# server refuses for a moment, or no pooled connection frees up in time. Retryable, never a bug.
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
)


# Redis commands in flight at once per client. Every SSE stream and every streaming call appends or reads in
# bursts, and a burst of submits publishes at once: past the pool, a command waits (up to
# REDIS_POOL_WAIT_SECONDS, or its caller's own deadline) for a connection instead of failing. (redis-py's own
# default pool refuses the 101st command in flight with MaxConnectionsError.)
REDIS_MAX_CONNECTIONS = 256
REDIS_POOL_WAIT_SECONDS = 5.0


def redis_py_url(url: str) -> str:
    """A Redis URL as redis-py spells it: kombu's `redis+socket://` is redis-py's `unix://`."""
    if url.startswith("redis+socket://"):
        return "unix://" + url.removeprefix("redis+socket://")
    return url


def redis_client(
    url: str,
    *,
    socket_timeout: float | None,
    connect_timeout: float,
    keepalive: bool = False,
    health_check_interval: float = 0,
) -> aioredis.Redis:
    """A Redis client with a bounded pool that queues, never refuses (REDIS_MAX_CONNECTIONS), for a `redis://`,
    `rediss://`, `unix://` or kombu's `redis+socket://` URL. TCP keep-alive only where there is TCP: a
    unix-socket connection refuses the option (TypeError)."""
    url = redis_py_url(url)
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "health_check_interval": health_check_interval,
    }
    if keepalive and not url.startswith("unix://"):
        options["socket_keepalive"] = True
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=REDIS_MAX_CONNECTIONS, timeout=REDIS_POOL_WAIT_SECONDS, **options
    )
    return aioredis.Redis.from_pool(pool)


def make_redis(settings: Settings) -> aioredis.Redis:
    """The process's Redis client (limits, revocation, event logs); the publisher and the wake-up subscriber have
    their own (`redis_client`)."""
    return redis_client(settings.redis_url, socket_timeout=2, connect_timeout=2)


def database_unavailable(exc: BaseException) -> bool:
    """Whether an error means "the database is (briefly) not there", including SQLAlchemy's generic wrapper."""
    if isinstance(exc, DATABASE_UNAVAILABLE):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
        # The asyncpg dialect wraps the driver's exception; the original is the cause of the wrapper.
        return any(isinstance(e, DATABASE_UNAVAILABLE) for e in (orig, getattr(orig, "__cause__", None)))
    return False


def make_engine(settings: Settings, application_name: str) -> AsyncEngine:
    """An asyncpg engine tagged with the process role, so `pg_stat_activity` tells who is who."""
    return create_async_engine(
        settings.async_database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"server_settings": {"application_name": application_name}},
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit, so responses can be built from them."""
    return async_sessionmaker(engine, expire_on_commit=False)


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Match SQLAlchemy's asyncpg dialect: JSON columns in and out as Python objects.
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _no_reset(conn: asyncpg.Connection) -> None:
    # The hot path runs single statements and leaves no session state (no LISTEN, locks or SET), so the
    # default reset on release would only cost a round trip per request.
    return None


async def make_raw_pool(settings: Settings, application_name: str) -> asyncpg.Pool:
    """A plain asyncpg pool for the request hot path (submit, poll): no ORM, no per-call statement building."""
    url = make_url(settings.async_database_url)
    kwargs: dict[str, Any] = {
        "user": url.username,
        "password": url.password,
        "database": url.database,
        "host": url.query.get("host") or url.host,
        "port": url.port,
    }
    return await asyncpg.create_pool(
        **{k: v for k, v in kwargs.items() if v is not None},
        # No connection at start: the API must come up (and report not-ready) while the database is down.
        min_size=0,
        max_size=settings.db_pool_size,
        init=_init_connection,
        reset=_no_reset,
        server_settings={"application_name": application_name},
    )


def per_redis_client(make: Callable[[aioredis.Redis, Settings], T]) -> Callable[[aioredis.Redis, Settings], T]:
    """`make(redis, settings)` once per Redis client of the process, then the same object: whatever registers
    Lua scripts on a client (the limiter, the response cache) does so once, not per request."""
    made: weakref.WeakKeyDictionary[aioredis.Redis, T] = weakref.WeakKeyDictionary()

    def get(redis: aioredis.Redis, settings: Settings) -> T:
        found = made.get(redis)
        if found is None:
            found = made[redis] = make(redis, settings)
        return found

    return get
