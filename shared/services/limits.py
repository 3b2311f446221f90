"""Which limits apply to a user: Settings defaults overlaid with an admin's overrides, cached per process."""

from __future__ import annotations

import time
import uuid

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from shared.config import Settings
from shared.errors import NotFound
from shared.limits import Limits
from shared.repositories import limits as repo
from shared.repositories import users as users_repo
from shared.repositories.queries_common import RowLike
from shared.schemas import LimitsIn, LimitsOut

# user id -> (monotonic expiry, limits). Per process; an admin's change reaches every API process within
# LIMITS_CACHE_SECONDS.
_cache: dict[uuid.UUID, tuple[float, Limits]] = {}
_CACHE_MAX = 100_000


def _overlay(settings: Settings, row: RowLike | None) -> Limits:
    base = Limits.defaults(settings)
    if row is None:
        return base
    return Limits(
        requests_per_minute=_pick(row["requests_per_minute"], base.requests_per_minute),
        max_pending=_pick(row["max_pending"], base.max_pending),
        token_budget=_pick(row["token_budget"], base.token_budget),
        token_window_seconds=base.token_window_seconds,
    )


def _pick(override: int | None, default: int) -> int:
    return default if override is None else override


async def effective_limits(db: asyncpg.Pool | asyncpg.Connection, settings: Settings, user_id: uuid.UUID) -> Limits:
    """The user's limits; at most one database read per user per LIMITS_CACHE_SECONDS in this process."""
    now = time.monotonic()
    hit = _cache.get(user_id)
    if hit is not None and hit[0] > now:
        return hit[1]
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            row = await repo.fetch_overrides(conn, user_id)
    else:
        row = await repo.fetch_overrides(db, user_id)
    limits = _overlay(settings, row)
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[user_id] = (now + settings.limits_cache_seconds, limits)
    return limits


def _out(settings: Settings, user_id: uuid.UUID, row: RowLike | None) -> LimitsOut:
    limits = _overlay(settings, row)
    return LimitsOut(
        user_id=user_id,
        requests_per_minute=limits.requests_per_minute,
        max_pending=limits.max_pending,
        token_budget=limits.token_budget,
        token_window_seconds=limits.token_window_seconds,
        fair_weight=(row["fair_weight"] if row else None) or 1,
        max_share=row["max_share"] if row else None,
        overrides=LimitsIn(
            requests_per_minute=row["requests_per_minute"] if row else None,
            max_pending=row["max_pending"] if row else None,
            token_budget=row["token_budget"] if row else None,
            fair_weight=row["fair_weight"] if row else None,
            max_share=row["max_share"] if row else None,
        ),
    )


async def set_user_limits(
    session: AsyncSession, settings: Settings, admin_id: uuid.UUID, user_id: uuid.UUID, body: LimitsIn
) -> LimitsOut:
    """An admin sets (or, with nulls, clears) a user's overrides; 404 for an unknown user."""
    if await users_repo.by_id(session, user_id) is None:
        raise NotFound("User not found", code="user_not_found")
    await repo.set_overrides(
        session,
        user_id,
        requests_per_minute=body.requests_per_minute,
        max_pending=body.max_pending,
        token_budget=body.token_budget,
        fair_weight=body.fair_weight,
        max_share=body.max_share,
        updated_by=admin_id,
    )
    _cache.pop(user_id, None)
    return _out(settings, user_id, body.model_dump())


async def get_user_limits(session: AsyncSession, settings: Settings, user_id: uuid.UUID) -> LimitsOut:
    if await users_repo.by_id(session, user_id) is None:
        raise NotFound("User not found", code="user_not_found")
    row = await repo.get_overrides(session, user_id)
    return _out(
        settings,
        user_id,
        None
        if row is None
        else {
            "requests_per_minute": row.requests_per_minute,
            "max_pending": row.max_pending,
            "token_budget": row.token_budget,
            "fair_weight": row.fair_weight,
            "max_share": row.max_share,
        },
    )
