"""Which errors mean "the database is briefly not there" (a 503 and a retry), and which are bugs."""

from __future__ import annotations

import asyncpg
import pytest
import redis
from sqlalchemy import exc as sa_exc

from shared.config import Settings
from shared.db import database_unavailable, make_redis, redis_py_url


def _wrapped(orig: BaseException, *, invalidated: bool = False) -> sa_exc.DBAPIError:
    return sa_exc.DBAPIError("SELECT 1", {}, orig, connection_invalidated=invalidated)  # type: ignore[arg-type]


def test_connection_failures_are_unavailable() -> None:
    assert database_unavailable(ConnectionRefusedError())
    assert database_unavailable(asyncpg.exceptions.CannotConnectNowError("starting up"))
    assert database_unavailable(asyncpg.exceptions.TooManyConnectionsError("too many clients"))
    assert database_unavailable(sa_exc.OperationalError("SELECT 1", {}, Exception("gone")))
    assert database_unavailable(_wrapped(Exception("x"), invalidated=True))


def test_the_dialects_generic_wrapper_is_looked_through() -> None:
    adapted = Exception("adapted")
    adapted.__cause__ = asyncpg.exceptions.ConnectionDoesNotExistError("closed")
    assert database_unavailable(_wrapped(adapted))
    assert database_unavailable(_wrapped(asyncpg.exceptions.AdminShutdownError("terminating")))


def test_real_errors_are_not_unavailable() -> None:
    assert not database_unavailable(ValueError("bug"))
    assert not database_unavailable(_wrapped(asyncpg.exceptions.UniqueViolationError("duplicate key")))
    assert not database_unavailable(sa_exc.IntegrityError("INSERT", {}, Exception("duplicate")))


@pytest.mark.anyio
async def test_redis_replies_are_parsed_in_c(server_urls: dict[str, str]) -> None:
    """hiredis (the `redis[hiredis]` extra) parses the replies of every Redis client of the processes: the
    asyncio ones (limits, events, the budget, the publisher) and kombu's synchronous one (the worker's consumer).
    Without it redis-py falls back to its pure-Python parser silently, at ~15-25 % more client CPU per round trip."""
    from redis._parsers.hiredis import _AsyncHiredisParser, _HiredisParser

    settings = Settings(redis_url=server_urls["redis"], jwt_secret_key="x" * 64)  # type: ignore[arg-type]
    client = make_redis(settings)
    try:
        assert await client.ping()
        connection = await client.connection_pool.get_connection()
        try:
            assert isinstance(connection._parser, _AsyncHiredisParser)
        finally:
            await client.connection_pool.release(connection)
    finally:
        await client.aclose()
    sync = redis.Redis.from_url(redis_py_url(server_urls["redis"]))
    try:
        assert sync.ping()
        assert isinstance(sync.connection_pool.get_connection()._parser, _HiredisParser)
    finally:
        sync.close()
