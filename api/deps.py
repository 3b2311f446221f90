"""Request dependencies: typed aliases for what routes use. Only this module reads `app.state`.

Database handles, one per use:
- `PoolDep`: the raw asyncpg pool, for routes that hold a connection only for their database step
  (submit releases it before the publish; a long-poll holds none while it waits).
- `ConnectionDep`: one pooled asyncpg connection; each statement autocommits.
- `SessionDep`: a session whose transaction commits when the route returns and rolls back when it raises.
- `AutocommitSessionDep`: each statement commits on its own: reads without BEGIN/ROLLBACK round trips, and
  the rare write whose commit must precede telling Redis (admin disable).

Who is calling: `CurrentUserId` (an access token or an API key, with the key's scope checked),
`SessionUserId`/`SessionPrincipal` (access tokens only), `AdminUserId` (access token of an admin). Each costs
one Redis MGET of revocation state (shared/services/credentials.py). `SubmitterDep` (submit only) reads an access
token's revocation state in the limits take's round trip instead.

The database dependencies exit with `scope="function"`: after the route returns but before the response is
sent (FastAPI >= 0.121; the default "request" scope would exit after sending). So a commit that fails
answers an error, never the route's 2xx, and a connection goes back to the pool before the client is served.
Every dependency here is `async def`: a plain `def` would cost a thread-pool hop per request.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

import asyncpg
import redis.asyncio as aioredis
from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy.ext.asyncio import AsyncSession

from shared.config import Settings
from shared.errors import Forbidden, Unauthorized
from shared.events import EventLog
from shared.metrics import QueueStats
from shared.models import Role
from shared.queue import Publisher
from shared.repositories import users as users_repo
from shared.services import credentials
from shared.services.credentials import READ_SCOPE, WRITE_SCOPE, DeferredCheck, Principal
from shared.wakeup import Wakeup

# auto_error=False: a missing token must come out as our JSON 401, not FastAPI's default body.
oauth2_scheme = OAuth2PasswordBearer(
    tokenUrl="/api/v1/auth/login",
    auto_error=False,
    description="An access token from login, or an API key (`aiq_…`) as the bearer token",
)
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def app_raw_pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool = request.app.state.raw_pool
    return pool


async def pool_connection(request: Request) -> AsyncIterator[asyncpg.Connection]:
    """One connection of the raw pool for the whole route; statements autocommit unless it opens a transaction."""
    async with request.app.state.raw_pool.acquire() as conn:
        yield conn


async def transaction(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's unit of work: committed when the route returns, rolled back when it raises."""
    async with request.app.state.sessionmaker() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        await session.commit()


async def autocommit_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A session whose every statement commits on its own."""
    async with request.app.state.autocommit_sessionmaker() as session:
        yield session


async def app_publisher(request: Request) -> Publisher:
    publisher: Publisher = request.app.state.publisher
    return publisher


async def app_redis(request: Request) -> aioredis.Redis:
    client: aioredis.Redis = request.app.state.redis
    return client


async def app_queue_stats(request: Request) -> QueueStats:
    stats: QueueStats = request.app.state.queue_stats
    return stats


async def app_event_log(request: Request) -> EventLog:
    log: EventLog = request.app.state.event_log
    return log


async def app_wakeup(request: Request) -> Wakeup:
    """The process's one wake-up subscriber (SSE streams and long-polls wait on it)."""
    wakeup: Wakeup = request.app.state.wakeup
    return wakeup


SettingsDep = Annotated[Settings, Depends(app_settings)]
PoolDep = Annotated[asyncpg.Pool, Depends(app_raw_pool)]
ConnectionDep = Annotated[asyncpg.Connection, Depends(pool_connection, scope="function")]
SessionDep = Annotated[AsyncSession, Depends(transaction, scope="function")]
AutocommitSessionDep = Annotated[AsyncSession, Depends(autocommit_session, scope="function")]
PublisherDep = Annotated[Publisher, Depends(app_publisher)]
RedisDep = Annotated[aioredis.Redis, Depends(app_redis)]
QueueStatsDep = Annotated[QueueStats, Depends(app_queue_stats)]
EventLogDep = Annotated[EventLog, Depends(app_event_log)]
WakeupDep = Annotated[Wakeup, Depends(app_wakeup)]


async def current_principal(request: Request, token: Annotated[str | None, Depends(oauth2_scheme)]) -> Principal:
    """Who is calling: an access token or an API key, checked against revocation state (one Redis MGET).

    It reads the handles off `app.state` itself rather than through `SettingsDep`, `RedisDep` and `PoolDep`:
    FastAPI solves every sub-dependency of every authenticated request afresh (even a cached one), and these
    three would cost most of what this dependency does itself.
    """
    if not token:
        raise Unauthorized("Not authenticated", code="not_authenticated")
    state = request.app.state
    return await credentials.resolve(state.settings, state.redis, state.raw_pool, token)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def _scoped_user_id(request: Request, principal: Principal) -> uuid.UUID:
    if principal.via == "api_key":
        needed = READ_SCOPE if request.method in _SAFE_METHODS else WRITE_SCOPE
        if needed not in principal.scopes:
            raise Forbidden(f"This API key lacks the {needed} scope", code="insufficient_scope")
    return principal.user_id


async def current_user_id(request: Request, principal: CurrentPrincipal) -> uuid.UUID:
    """The caller's user id. An API key needs `queries:read` for reading (GET) routes, `queries:write` for others."""
    return _scoped_user_id(request, principal)


CurrentUserId = Annotated[uuid.UUID, Depends(current_user_id)]


@dataclass(frozen=True, slots=True)
class Submitter:
    user_id: uuid.UUID
    # An access token's revocation state, still to be read: with the submit's limits, in the same round trip.
    check: DeferredCheck | None


async def submitter(request: Request, token: Annotated[str | None, Depends(oauth2_scheme)]) -> Submitter:
    """`CurrentUserId` for a submit, whose limits take reads an access token's revocation state in the same Redis
    round trip (`credentials.resolve_deferred`): the service runs `check` before it takes or stores anything. The
    token's signature and expiry are checked here; so only a well-signed but revoked token with an invalid body
    hears the body's 422 before its 401."""
    if not token:
        raise Unauthorized("Not authenticated", code="not_authenticated")
    state = request.app.state
    principal, check = await credentials.resolve_deferred(state.settings, state.redis, state.raw_pool, token)
    return Submitter(_scoped_user_id(request, principal), check)


SubmitterDep = Annotated[Submitter, Depends(submitter)]


async def session_principal(principal: CurrentPrincipal) -> Principal:
    """An access token's principal: managing keys, logging out and admin work are not for API keys."""
    if principal.via != "access_token":
        raise Forbidden("This needs an access token from login, not an API key", code="access_token_required")
    return principal


SessionPrincipal = Annotated[Principal, Depends(session_principal)]


async def session_user_id(principal: SessionPrincipal) -> uuid.UUID:
    return principal.user_id


SessionUserId = Annotated[uuid.UUID, Depends(session_user_id)]


async def admin_user_id(user_id: SessionUserId, session: AutocommitSessionDep) -> uuid.UUID:
    """The caller's id if they hold the admin role (one read: admin routes are not a hot path)."""
    user = await users_repo.by_id(session, user_id)
    if user is None or user.disabled_at is not None or user.role != Role.ADMIN:
        raise Forbidden("This needs the admin role", code="admin_required")
    return user_id


AdminUserId = Annotated[uuid.UUID, Depends(admin_user_id)]
