"""Request dependencies: typed aliases for what routes use. Only this module reads `app.state`.

Database handles, one per use (besides `Handles.pool`):
- `ConnectionDep`: one pooled asyncpg connection; each statement autocommits.
- `SessionDep`: a session whose transaction commits when the route returns and rolls back when it raises.
- `AutocommitSessionDep`: each statement commits on its own: reads without BEGIN/ROLLBACK round trips, and
  the rare write whose commit must precede telling Redis (admin disable).

Process handles: `HandlesDep`, every long-lived handle of the process in one object (`Handles`: settings, the raw
asyncpg pool, Redis, the publisher, the event log, the wake-up subscriber, the queue stats), made once in the
lifespan. One dependency rather than one per handle: FastAPI solves every dependency afresh on each request
(~20 µs apiece, even one that only reads `app.state`), and the hot routes need four or five handles. Routes hold
the raw pool only for their database step (submit releases it before the publish; a long-poll holds none while
it waits).

Who is calling: `CurrentUserId` (an access token or an API key, with the key's scope checked), `ScopedPrincipal`
(the same checks, the principal itself: what an open stream re-checks), `SessionUserId`/`SessionPrincipal` (access
tokens only), `AdminUserId` (access token of an admin). Each costs
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


@dataclass(frozen=True, slots=True)
class Handles:
    """The process's long-lived handles, made once in the lifespan (`app.state.handles`)."""

    settings: Settings
    pool: asyncpg.Pool
    redis: aioredis.Redis
    publisher: Publisher
    events: EventLog
    wakeup: Wakeup
    queue_stats: QueueStats


async def app_handles(request: Request) -> Handles:
    handles: Handles = request.app.state.handles
    return handles


async def pool_connection(request: Request) -> AsyncIterator[asyncpg.Connection]:
    """One connection of the raw pool for the whole route; statements autocommit unless it opens a transaction."""
    async with request.app.state.handles.pool.acquire() as conn:
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


HandlesDep = Annotated[Handles, Depends(app_handles)]
ConnectionDep = Annotated[asyncpg.Connection, Depends(pool_connection, scope="function")]
SessionDep = Annotated[AsyncSession, Depends(transaction, scope="function")]
AutocommitSessionDep = Annotated[AsyncSession, Depends(autocommit_session, scope="function")]


Token = Annotated[str | None, Depends(oauth2_scheme)]


async def _principal(request: Request, token: str | None) -> Principal:
    """Who is calling: an access token or an API key, checked against revocation state (one Redis MGET)."""
    if not token:
        raise Unauthorized("Not authenticated", code="not_authenticated")
    handles: Handles = request.app.state.handles
    return await credentials.resolve(handles.settings, handles.redis, handles.pool, token)


async def current_principal(request: Request, token: Token) -> Principal:
    """Who is calling (`_principal`), for the routes that look at the principal itself."""
    return await _principal(request, token)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def _scoped_user_id(request: Request, principal: Principal) -> uuid.UUID:
    """The principal's user id; an API key needs `queries:read` for reading (GET) routes, `queries:write` for others."""
    if principal.via == "api_key":
        needed = READ_SCOPE if request.method in _SAFE_METHODS else WRITE_SCOPE
        if needed not in principal.scopes:
            raise Forbidden(f"This API key lacks the {needed} scope", code="insufficient_scope")
    return principal.user_id


async def current_user_id(request: Request, token: Token) -> uuid.UUID:
    """The caller's user id. An API key needs `queries:read` for reading (GET) routes, `queries:write` for others.

    It resolves the principal itself rather than through `CurrentPrincipal`: each level of dependencies costs
    every authenticated request its own solving."""
    return _scoped_user_id(request, await _principal(request, token))


CurrentUserId = Annotated[uuid.UUID, Depends(current_user_id)]


async def scoped_principal(request: Request, token: Token) -> Principal:
    """`CurrentUserId`'s checks, for a route that needs the principal itself (a stream re-checks it while it runs):
    `.user_id` is the caller's id. Resolved here, as `current_user_id` does, rather than through `CurrentPrincipal`."""
    principal = await _principal(request, token)
    _scoped_user_id(request, principal)
    return principal


ScopedPrincipal = Annotated[Principal, Depends(scoped_principal)]


@dataclass(frozen=True, slots=True)
class Submitter:
    # Whose credential it is (a stream re-checks it): to be served only once `check` has passed.
    principal: Principal
    # An access token's revocation state, still to be read: with the submit's limits, in the same round trip.
    check: DeferredCheck | None

    @property
    def user_id(self) -> uuid.UUID:
        return self.principal.user_id


async def submitter(request: Request, token: Token) -> Submitter:
    """`CurrentUserId` for a submit, whose limits take reads an access token's revocation state in the same Redis
    round trip (`credentials.resolve_deferred`): the service runs `check` before it takes or stores anything. The
    token's signature and expiry are checked here; so only a well-signed but revoked token with an invalid body
    hears the body's 422 before its 401."""
    if not token:
        raise Unauthorized("Not authenticated", code="not_authenticated")
    handles: Handles = request.app.state.handles
    principal, check = await credentials.resolve_deferred(handles.settings, handles.redis, handles.pool, token)
    _scoped_user_id(request, principal)
    return Submitter(principal, check)


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
