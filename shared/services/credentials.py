"""Who is calling: a bearer credential (access token or API key) resolved to a principal on the hot path.

Cost per request: the JWT's claims come from an in-process cache of verified tokens (shared/security.py) or an
API key's facts from an in-process cache (below); then one Redis MGET reads the revocation state (logged-out
token, revoked family or key, the user's disabled/valid-after state); a submit with an access token reads them
inside its limits script instead (`resolve_deferred`, `revocation.GUARD_LUA`). PostgreSQL is read only on a cache
miss: a user's state once per USER_STATE_TTL_SECONDS for all processes, a key once per process per
KEY_CACHE_SECONDS.

Redis unreachable: the same checks are answered by PostgreSQL (one query per request while the outage
lasts), so no revoked credential gets in and the API stays available (submits are accepted and sent later by
the sweeper). A token revoked by logout or reuse is refused through its family's rows; a token without a
family claim (issued before families existed) cannot be checked that way and is refused (503) until
Redis is back. Logout, key revocation and admin disable need Redis and answer 503 `auth_unavailable`.

An open stream re-checks the principal it was opened with (`still_valid`: the same state, one MGET, at most once
per keep-alive interval); a stream is not ended for state that cannot be read.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import asyncpg
import redis.asyncio as aioredis

from shared import revocation
from shared.config import Settings
from shared.errors import Unauthorized
from shared.repositories import credentials_asyncpg as repo
from shared.security import TokenClaims, decode_token

log = logging.getLogger(__name__)

API_KEY_PREFIX = "aiq_"
READ_SCOPE = "queries:read"
WRITE_SCOPE = "queries:write"
ALL_SCOPES = frozenset({READ_SCOPE, WRITE_SCOPE})
# A key's id, owner and scopes never change; revocation is checked in Redis on every use, so this only
# bounds memory and how long a process trusts a row it read (REVOKED_KEY_TTL_SECONDS covers it twice).
KEY_CACHE_SECONDS = 60.0
# `last_used_at` is written in one batched UPDATE per process at most this often.
LAST_USED_FLUSH_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: uuid.UUID
    via: Literal["access_token", "api_key"]
    scopes: frozenset[str]
    token: TokenClaims | None = None
    key_id: uuid.UUID | None = None


def hash_api_key(secret: str) -> str:
    """SHA-256: the secret has 256 bits of entropy, so a slow hash would add cost and no safety."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class _KeyFacts:
    key_id: uuid.UUID
    user_id: uuid.UUID
    scopes: frozenset[str]
    read_at: float


class _KeyCache:
    def __init__(self, size: int) -> None:
        self._size = size
        self._facts: OrderedDict[str, _KeyFacts] = OrderedDict()

    def get(self, secret_hash: str) -> _KeyFacts | None:
        facts = self._facts.get(secret_hash)
        if facts is not None and time.monotonic() - facts.read_at > KEY_CACHE_SECONDS:
            self._facts.pop(secret_hash, None)
            return None
        return facts

    def put(self, secret_hash: str, facts: _KeyFacts) -> None:
        self._facts[secret_hash] = facts
        if len(self._facts) > self._size:
            self._facts.popitem(last=False)

    def drop(self, key_id: uuid.UUID) -> None:
        for secret_hash, facts in list(self._facts.items()):
            if facts.key_id == key_id:
                self._facts.pop(secret_hash, None)


class _LastUsed:
    """Collects key uses and writes them in one UPDATE at most every LAST_USED_FLUSH_SECONDS per process."""

    def __init__(self) -> None:
        self._pending: dict[uuid.UUID, datetime] = {}
        self._flushed_at = float("-inf")
        self._tasks: set[asyncio.Task[None]] = set()

    def record(self, pool: asyncpg.Pool, key_id: uuid.UUID) -> None:
        self._pending[key_id] = datetime.now(UTC)
        now = time.monotonic()
        if now - self._flushed_at < LAST_USED_FLUSH_SECONDS or self._tasks:
            return
        self._flushed_at = now
        batch, self._pending = self._pending, {}
        task = asyncio.get_running_loop().create_task(self._write(pool, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, pool: asyncpg.Pool, batch: dict[uuid.UUID, datetime]) -> None:
        try:
            await repo.touch_api_keys(pool, batch)
        except Exception as exc:  # noqa: BLE001 - bookkeeping only: a lost batch must never fail a request
            log.warning("could not record API key use", extra={"error": type(exc).__name__})


_keys = _KeyCache(size=10_000)
_last_used = _LastUsed()


def forget_api_key(key_id: uuid.UUID) -> None:
    """Drop a revoked key from this process's cache (other processes see the Redis marker)."""
    _keys.drop(key_id)


async def _load_user_state(pool: asyncpg.Pool, user_id: uuid.UUID) -> revocation.UserState:
    row = await repo.user_state(pool, user_id)
    if row is None:
        return revocation.GONE
    disabled, valid_after = row
    return revocation.UserState(disabled=disabled, sessions_valid_after=valid_after)


async def _check_user(
    redis: aioredis.Redis, pool: asyncpg.Pool, user_id: uuid.UUID, cached: bytes | None
) -> revocation.UserState:
    state = await revocation.user_state(redis, user_id, cached, lambda: _load_user_state(pool, user_id))
    if state.disabled:
        raise Unauthorized("This account is disabled", code="account_disabled")
    return state


def _state_keys(principal: Principal) -> list[str]:
    """The markers that revoke the principal's credential, then its user's state: what one MGET reads."""
    if principal.token is not None:
        keys = [revocation.jti_key(principal.token.jti)]
        if principal.token.family_id is not None:
            keys.append(revocation.family_key(principal.token.family_id))
    else:
        assert principal.key_id is not None  # an API key's principal
        keys = [revocation.api_key_key(principal.key_id)]
    keys.append(revocation.user_key(principal.user_id))
    return keys


async def _check_state(
    redis: aioredis.Redis, pool: asyncpg.Pool, principal: Principal, values: list[bytes | None]
) -> None:
    """401 when the state read by `_state_keys` refuses the principal: a marker set (logged-out token, revoked
    family or key), the account disabled or gone, an access token issued before the user's valid-after instant."""
    *revoked, cached_state = values
    if any(revoked):
        if principal.key_id is not None:
            _keys.drop(principal.key_id)
            raise Unauthorized("Invalid API key", code="invalid_api_key")
        raise Unauthorized("Token has been revoked", code="token_revoked")
    state = await _check_user(redis, pool, principal.user_id, cached_state)
    token = principal.token
    if token is not None and state.sessions_valid_after is not None and token.issued_at < state.sessions_valid_after:
        raise Unauthorized("Token has been revoked", code="token_revoked")


async def still_valid(redis: aioredis.Redis, pool: asyncpg.Pool, principal: Principal) -> bool:
    """Whether a principal let in earlier may still be served: the re-check of a long-lived response (an event
    stream), run at most once per keep-alive interval. False for all that `resolve` would now refuse: an access
    token expired or revoked (logout, its refresh family, "log out everywhere"), an API key revoked, the account
    disabled or deleted. True when the state cannot be read now (the next re-check will tell): an outage must
    not end healthy streams."""
    token = principal.token
    if token is not None and token.expires_at <= datetime.now(UTC):
        return False
    try:
        await _check_state(redis, pool, principal, await revocation.read(redis, _state_keys(principal)))
    except Unauthorized:
        return False
    except (revocation.AuthUnavailable, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        return True
    return True


async def resolve(settings: Settings, redis: aioredis.Redis, pool: asyncpg.Pool, bearer: str) -> Principal:
    """The principal behind a bearer credential, or a 401 (503 when revocation state cannot be read)."""
    if bearer.startswith(API_KEY_PREFIX):
        return await _resolve_api_key(redis, pool, bearer)
    claims = decode_token(settings, bearer, "access")
    principal = Principal(user_id=claims.user_id, via="access_token", scopes=ALL_SCOPES, token=claims)
    try:
        values = await revocation.read(redis, _state_keys(principal))
    except revocation.AuthUnavailable:
        return await _token_from_database(pool, claims)
    await _check_state(redis, pool, principal, values)
    return principal


@dataclass(frozen=True, slots=True)
class DeferredCheck:
    """An access token verified offline whose revocation state is still to be read: with the submit's limits
    (`guard`, one Redis round trip for both), or on its own (`run`)."""

    settings: Settings
    redis: aioredis.Redis
    pool: asyncpg.Pool
    bearer: str
    guard: revocation.Guard

    async def run(self) -> None:
        """The full check of `resolve`: 401 for a revoked credential or disabled account (503 if nothing can tell)."""
        await resolve(self.settings, self.redis, self.pool, self.bearer)


async def resolve_deferred(
    settings: Settings, redis: aioredis.Redis, pool: asyncpg.Pool, bearer: str
) -> tuple[Principal, DeferredCheck | None]:
    """`resolve` for a submit: an access token is verified here and its revocation state read later, with the limits
    (the check must have passed before anything is stored); an API key is checked at once (no check returned)."""
    if bearer.startswith(API_KEY_PREFIX):
        return await _resolve_api_key(redis, pool, bearer), None
    claims = decode_token(settings, bearer, "access")
    keys = [revocation.user_key(claims.user_id), revocation.jti_key(claims.jti)]
    if claims.family_id is not None:
        keys.append(revocation.family_key(claims.family_id))
    check = DeferredCheck(settings, redis, pool, bearer, revocation.Guard(keys, claims.issued_at.timestamp()))
    return Principal(user_id=claims.user_id, via="access_token", scopes=ALL_SCOPES, token=claims), check


async def _token_from_database(pool: asyncpg.Pool, claims: TokenClaims) -> Principal:
    if claims.family_id is None:
        raise revocation.AuthUnavailable
    row = await repo.token_state(pool, claims.user_id, claims.family_id)
    if row is None or row[0]:
        raise Unauthorized("This account is disabled", code="account_disabled")
    _, valid_after, family_revoked = row
    if family_revoked or (valid_after is not None and claims.issued_at < valid_after):
        raise Unauthorized("Token has been revoked", code="token_revoked")
    return Principal(user_id=claims.user_id, via="access_token", scopes=ALL_SCOPES, token=claims)


async def _api_key_from_database(pool: asyncpg.Pool, secret_hash: str) -> Principal:
    row = await repo.api_key_by_hash(pool, secret_hash)
    if row is None:
        raise Unauthorized("Invalid API key", code="invalid_api_key")
    key_id, user_id, scopes = row
    state = await repo.user_state(pool, user_id)
    if state is None or state[0]:
        raise Unauthorized("This account is disabled", code="account_disabled")
    _last_used.record(pool, key_id)
    return Principal(user_id=user_id, via="api_key", scopes=frozenset(scopes), key_id=key_id)


async def _resolve_api_key(redis: aioredis.Redis, pool: asyncpg.Pool, secret: str) -> Principal:
    secret_hash = hash_api_key(secret)
    facts = _keys.get(secret_hash)
    if facts is None:
        row = await repo.api_key_by_hash(pool, secret_hash)
        if row is None:
            raise Unauthorized("Invalid API key", code="invalid_api_key")
        key_id, user_id, scopes = row
        facts = _KeyFacts(key_id=key_id, user_id=user_id, scopes=frozenset(scopes), read_at=time.monotonic())
        _keys.put(secret_hash, facts)
    principal = Principal(user_id=facts.user_id, via="api_key", scopes=facts.scopes, key_id=facts.key_id)
    try:
        values = await revocation.read(redis, _state_keys(principal))
    except revocation.AuthUnavailable:
        return await _api_key_from_database(pool, secret_hash)
    await _check_state(redis, pool, principal, values)
    _last_used.record(pool, facts.key_id)
    return principal


async def check_user_active(redis: aioredis.Redis, pool: asyncpg.Pool, user_id: uuid.UUID) -> None:
    """401 `account_disabled` when the user is disabled (refresh uses it before issuing new tokens)."""
    (cached,) = await revocation.read(redis, [revocation.user_key(user_id)])
    await _check_user(redis, pool, user_id, cached)
