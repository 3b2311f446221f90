"""Which errors mean "the database is briefly not there" (a 503 and a retry), and which are bugs."""

from __future__ import annotations

import asyncpg
from sqlalchemy import exc as sa_exc

from shared.db import database_unavailable


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
