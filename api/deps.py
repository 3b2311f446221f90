"""Request dependencies: typed aliases for the session, settings and the authenticated user."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy.ext.asyncio import AsyncSession

from shared.config import Settings
from shared.errors import Unauthorized
from shared.queue import Publisher
from shared.security import decode_token

# auto_error=False: a missing token must come out as our JSON 401, not FastAPI's default body.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/login", auto_error=False)


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A session per request; handlers commit explicitly, anything else is rolled back.

    Every dependency here is `async def`: a plain `def` would cost a thread-pool hop per request.
    """
    async with request.app.state.sessionmaker() as session:
        yield session


async def get_read_session(request: Request) -> AsyncIterator[AsyncSession]:
    """Autocommit session for single-statement reads: no BEGIN/ROLLBACK round trips."""
    async with request.app.state.read_sessionmaker() as session:
        yield session


async def get_publisher(request: Request) -> Publisher:
    publisher: Publisher = request.app.state.publisher
    return publisher


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
ReadSessionDep = Annotated[AsyncSession, Depends(get_read_session)]
PublisherDep = Annotated[Publisher, Depends(get_publisher)]


async def current_user_id(settings: SettingsDep, token: Annotated[str | None, Depends(oauth2_scheme)]) -> uuid.UUID:
    """The user id of a valid access token; no database round trip on the hot path."""
    if not token:
        raise Unauthorized("Not authenticated", code="not_authenticated")
    return decode_token(settings, token, "access").user_id


CurrentUserId = Annotated[uuid.UUID, Depends(current_user_id)]
