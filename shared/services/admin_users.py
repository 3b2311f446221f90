"""What an admin does to accounts: find them, disable and enable them."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncSession

from shared import revocation
from shared.errors import Conflict, NotFound
from shared.models import RevokedReason, Role, User
from shared.repositories import users as users_repo

security_log = logging.getLogger("aiq.security")


async def search(
    session: AsyncSession, text: str | None, role: Role | None, limit: int, offset: int
) -> tuple[Sequence[User], int]:
    return await users_repo.search(session, text, role, limit, offset)


async def set_disabled(
    session: AsyncSession, redis: aioredis.Redis, actor_id: uuid.UUID, user_id: uuid.UUID, disabled: bool
) -> User:
    """Disable or enable; takes an autocommit session so Redis is written after PostgreSQL has committed.

    Publishing the new state after the commit (a plain SET) while cache fills use SET NX means no API process
    can re-cache the old state. Disabling refuses the user's access tokens and API keys on every API process
    from the next request on, and revokes their refresh tokens; enabling lets them log in again and their API
    keys work again (tokens from before the disable stay dead).
    """
    if disabled and actor_id == user_id:
        raise Conflict("Admins cannot disable themselves", code="cannot_disable_self")
    user = await users_repo.set_disabled(session, user_id, disabled)
    if user is None:
        raise NotFound("User not found", code="user_not_found")
    state = revocation.UserState(disabled=disabled, sessions_valid_after=user.sessions_valid_after)
    # If this fails (503), PostgreSQL already holds the change: the admin retries, which publishes it again.
    await revocation.publish_user_state(redis, user_id, state)
    if disabled:
        await users_repo.revoke_all_refresh_tokens(session, user_id, RevokedReason.DISABLED)
    security_log.warning(
        "account disabled" if disabled else "account enabled",
        extra={
            "event": "account_disabled" if disabled else "account_enabled",
            "user_id": str(user_id),
            "actor_id": str(actor_id),
        },
    )
    return user
