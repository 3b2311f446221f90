"""Deleting an account erases everything it owns."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from shared.cache import ResponseCache
from shared.config import Settings
from shared.errors import NotFound
from shared.events import EventLog
from shared.limits import Limiter
from shared.repositories import accounts as repo


async def delete_account(
    session: AsyncSession,
    settings: Settings,
    limiter: Limiter,
    events: EventLog,
    cache: ResponseCache,
    user_id: uuid.UUID,
) -> None:
    """Delete the user with its queries (prompts, answers, usage), limits and refresh tokens, and what Redis
    holds of its answers: the event logs still alive and its per-user cached answers.

    Queries still pending or running go too: a worker that holds one finds its row gone and writes nothing.
    Their token reservations are released.
    """
    logged_since = datetime.now(UTC) - timedelta(seconds=settings.event_log_ttl_seconds)
    unfinished, logged = await repo.live_query_ids(session, user_id, logged_since)
    if not await repo.delete_user(session, user_id):
        raise NotFound("User not found", code="user_not_found")
    for query_id in unfinished:
        await limiter.settle_quietly(query_id, 0)
    await events.discard(*logged)
    await cache.forget_user(user_id)
