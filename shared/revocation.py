"""Revocation state in Redis, read with one round trip per authenticated request.

Keys (all carry ids only, never token text):
- `aiq:auth:jti:<jti>`: a logged-out access token, kept until it would expire anyway;
- `aiq:auth:fam:<family>`: a revoked refresh family, kept as long as its access tokens can live;
- `aiq:auth:key:<key id>`: a revoked API key, kept while any process may still hold it in its key cache;
- `aiq:auth:user:<user id>`: a cache of the user's state in PostgreSQL (the truth): `disabled`, or `ok:<t>`
  where access tokens issued before unix time `t` are refused. Filled with SET NX from the database on a miss;
  a change writes it with a plain SET after the database has committed, so a fill that read the old row
  can never overwrite a newer state. Logging out everywhere and a password change write it before their commit,
  as logout writes its markers (a fill's SET NX cannot overwrite it either way): if Redis fails nothing is
  committed, and if the commit fails Redis is only stricter than PostgreSQL until the entry expires.

Redis unreachable: reads fall back to PostgreSQL (shared/services/credentials.py); writes (logout, logging out
everywhere, a password change, key revocation, disable) fail with a 503 (`auth_unavailable`, Retry-After), never a
401 that would make clients throw their credentials away. Redis flushed or restarted without persistence: user states
refill from PostgreSQL, but logged-out access tokens and revoked families come back to life until they expire
(at most ACCESS_TOKEN_TTL_SECONDS); refresh tokens and API keys stay revoked (PostgreSQL).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.config import Settings
from shared.errors import AppError

# How long a user's state stays cached in Redis before it is re-read from PostgreSQL.
USER_STATE_TTL_SECONDS = 300
# At least twice the in-process API key cache's lifetime (shared/services/credentials.py).
REVOKED_KEY_TTL_SECONDS = 600
DISABLED = b"disabled"


class AuthUnavailable(AppError):
    """Revocation state cannot be read: refuse rather than let a revoked credential through."""

    status_code = 503
    code = "auth_unavailable"

    def __init__(self) -> None:
        super().__init__("Credentials cannot be checked right now; retry shortly", headers={"Retry-After": "2"})


@dataclass(frozen=True, slots=True)
class UserState:
    disabled: bool
    # Access tokens issued before this are refused; None: none are.
    sessions_valid_after: datetime | None

    def encode(self) -> str:
        if self.disabled:
            return DISABLED.decode()
        after = self.sessions_valid_after.timestamp() if self.sessions_valid_after else 0
        return f"ok:{after:.6f}"

    @classmethod
    def decode(cls, raw: bytes) -> UserState:
        if raw == DISABLED:
            return cls(disabled=True, sessions_valid_after=None)
        after = float(raw.removeprefix(b"ok:"))
        return cls(disabled=False, sessions_valid_after=datetime.fromtimestamp(after, UTC) if after else None)


GONE = UserState(disabled=True, sessions_valid_after=None)


class CheckNeeded(Exception):
    """The one-round-trip check (`GUARD_LUA`) could not clear a credential: run the full check."""


@dataclass(frozen=True, slots=True)
class Guard:
    """What `GUARD_LUA` checks inside another script: `keys[0]` the user's state, the rest markers that must not
    exist; `issued_at` the access token's issue time (unix seconds)."""

    keys: list[str]
    issued_at: float


# A Lua function for another script (the submit's limits take, shared/limits.py) that reads the revocation state of
# an access token in the same round trip. It clears a token only where the full check (shared/services/credentials.py)
# would pass: the user's state cached, not disabled, issued at least 1 ms after its valid-after instant (so no
# rounding can tell them apart), no marker set. Anything else (a revoked or disabled credential, a state not cached)
# is "unsure": the caller runs the full check, which gives the right answer and refills the cache.
GUARD_LUA = """
local function revocation_clear(first, last, issued_at)
  local state = redis.call('GET', KEYS[first])
  if not state or string.sub(state, 1, 3) ~= 'ok:' then return false end
  local after = tonumber(string.sub(state, 4))
  if after == nil or issued_at == nil or issued_at < after + 0.001 then return false end
  for i = first + 1, last do
    if redis.call('EXISTS', KEYS[i]) == 1 then return false end
  end
  return true
end
"""


def jti_key(jti: uuid.UUID) -> str:
    return f"aiq:auth:jti:{jti}"


def family_key(family_id: uuid.UUID) -> str:
    return f"aiq:auth:fam:{family_id}"


def api_key_key(key_id: uuid.UUID) -> str:
    return f"aiq:auth:key:{key_id}"


def user_key(user_id: uuid.UUID) -> str:
    return f"aiq:auth:user:{user_id}"


async def read(redis: aioredis.Redis, keys: list[str]) -> list[bytes | None]:
    """One MGET; the last key is the user's state. Fails closed."""
    try:
        values = await redis.mget(keys)
    except (RedisError, OSError) as exc:
        raise AuthUnavailable from exc
    return [v.encode() if isinstance(v, str) else v for v in values]


async def user_state(
    redis: aioredis.Redis, user_id: uuid.UUID, cached: bytes | None, load: Callable[[], Awaitable[UserState]]
) -> UserState:
    """The cached state, or the database's, cached with SET NX so it never overwrites a newer write."""
    if cached is not None:
        return UserState.decode(cached)
    state = await load()
    try:
        await redis.set(user_key(user_id), state.encode(), ex=USER_STATE_TTL_SECONDS, nx=True)
    except (RedisError, OSError) as exc:
        raise AuthUnavailable from exc
    return state


async def _set(redis: aioredis.Redis, keys: Iterable[str], value: str, ttl: int) -> None:
    """Write these markers, in one round trip however many; 503 `AuthUnavailable` when Redis cannot take them."""
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.set(key, value, ex=max(ttl, 1))
            await pipe.execute()
    except (RedisError, OSError) as exc:
        raise AuthUnavailable from exc


async def revoke_access_token(redis: aioredis.Redis, jti: uuid.UUID, expires_at: datetime) -> None:
    """Refuse this access token until it expires (plus the verifier's leeway)."""
    await _set(redis, [jti_key(jti)], "1", int((expires_at - datetime.now(UTC)).total_seconds()) + 10)


async def revoke_families(redis: aioredis.Redis, settings: Settings, *family_ids: uuid.UUID) -> None:
    """Refuse every access token of these refresh families for as long as one of them can be alive (one round
    trip however many)."""
    if family_ids:
        await _set(redis, map(family_key, family_ids), "1", settings.access_token_ttl_seconds + 10)


async def revoke_api_key(redis: aioredis.Redis, key_id: uuid.UUID) -> None:
    await _set(redis, [api_key_key(key_id)], "1", REVOKED_KEY_TTL_SECONDS)


async def publish_user_state(redis: aioredis.Redis, user_id: uuid.UUID, state: UserState) -> None:
    """After the database committed a change: every API process sees it on its next request."""
    await _set(redis, [user_key(user_id)], state.encode(), USER_STATE_TTL_SECONDS)
