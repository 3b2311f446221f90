"""The hot path's credential SQL on the raw asyncpg pool: run only on a cache miss, never per request."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

_USER_STATE = "SELECT disabled_at, sessions_valid_after FROM users WHERE id = $1"
_KEY_BY_HASH = "SELECT id, user_id, scopes FROM api_keys WHERE secret_hash = $1 AND revoked_at IS NULL"
# Redis unreachable: the same answers from the truth, one statement per request while the outage lasts. A
# family is dead once any of its tokens was revoked for a reason other than rotation.
_SESSION_STATE_SQL = """
SELECT u.disabled_at, u.sessions_valid_after,
       EXISTS (SELECT 1 FROM refresh_tokens t
               WHERE t.family_id = $2 AND t.revoked_reason IS NOT NULL AND t.revoked_reason <> 'rotated')
         AS family_revoked
FROM users AS u WHERE u.id = $1
"""
# One statement for a batch of keys; a later timestamp never moves back.
_TOUCH_KEYS = """
UPDATE api_keys AS k SET last_used_at = GREATEST(k.last_used_at, u.used_at)
FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, used_at)
WHERE k.id = u.id
"""


async def user_state(pool: asyncpg.Pool, user_id: uuid.UUID) -> tuple[bool, datetime | None] | None:
    """(disabled, sessions_valid_after) of a user; None when there is no such user."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(_USER_STATE, user_id)
    if row is None:
        return None
    return row["disabled_at"] is not None, row["sessions_valid_after"]


async def token_state(
    pool: asyncpg.Pool, user_id: uuid.UUID, family_id: uuid.UUID | None
) -> tuple[bool, datetime | None, bool] | None:
    """(disabled, sessions_valid_after, family revoked) for a token; None when there is no such user."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(_SESSION_STATE_SQL, user_id, family_id)
    if row is None:
        return None
    return row["disabled_at"] is not None, row["sessions_valid_after"], bool(row["family_revoked"])


async def api_key_by_hash(pool: asyncpg.Pool, secret_hash: str) -> tuple[uuid.UUID, uuid.UUID, list[str]] | None:
    """(key id, user id, scopes) of a live key with this hash."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(_KEY_BY_HASH, secret_hash)
    if row is None:
        return None
    return row["id"], row["user_id"], list(row["scopes"])


async def touch_api_keys(pool: asyncpg.Pool, used: dict[uuid.UUID, datetime]) -> None:
    async with pool.acquire() as conn:
        await conn.execute(_TOUCH_KEYS, list(used), list(used.values()))
