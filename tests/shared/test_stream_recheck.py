"""`credentials.still_valid`, the re-check an open stream runs once per keep-alive interval, on the real Redis and
PostgreSQL: it ends a stream for everything `resolve` would now refuse, and never for state it cannot read."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis

from devkit.procs import free_port
from shared import revocation
from shared.config import Settings
from shared.db import make_raw_pool
from shared.security import TokenClaims
from shared.services.credentials import ALL_SCOPES, Principal, still_valid

pytestmark = pytest.mark.anyio

NOW = datetime.now(UTC)
OK = revocation.UserState(disabled=False, sessions_valid_after=None)


@pytest.fixture
async def pool(repo_database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await make_raw_pool(Settings(database_url=repo_database_url), "aiq-tests")
    try:
        yield pool
    finally:
        await pool.close()


def _token_principal(*, expires_in: float = 600, family: bool = True) -> Principal:
    claims = TokenClaims(
        user_id=uuid.uuid4(),
        jti=uuid.uuid4(),
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in),
        issued_at=NOW,
        family_id=uuid.uuid4() if family else None,
    )
    return Principal(user_id=claims.user_id, via="access_token", scopes=ALL_SCOPES, token=claims)


def _key_principal() -> Principal:
    return Principal(user_id=uuid.uuid4(), via="api_key", scopes=ALL_SCOPES, key_id=uuid.uuid4())


async def test_a_live_token_and_key_stay_valid_and_an_expired_token_does_not(
    redis: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    for principal in (_token_principal(), _token_principal(family=False), _key_principal()):
        await revocation.publish_user_state(redis, principal.user_id, OK)
        assert await still_valid(redis, pool, principal)
    expired = _token_principal(expires_in=-1)
    await revocation.publish_user_state(redis, expired.user_id, OK)
    assert not await still_valid(redis, pool, expired)


async def test_each_revocation_ends_validity(redis: aioredis.Redis, pool: asyncpg.Pool) -> None:
    logged_out = _token_principal()
    assert logged_out.token is not None
    await revocation.publish_user_state(redis, logged_out.user_id, OK)
    await revocation.revoke_access_token(redis, logged_out.token.jti, logged_out.token.expires_at)

    family_revoked = _token_principal()
    assert family_revoked.token is not None
    assert family_revoked.token.family_id is not None
    await revocation.publish_user_state(redis, family_revoked.user_id, OK)
    await revocation.revoke_families(redis, Settings(), family_revoked.token.family_id)

    # "Log out everywhere": tokens issued before the instant are refused.
    everywhere = _token_principal()
    later = revocation.UserState(disabled=False, sessions_valid_after=NOW + timedelta(milliseconds=1))
    await revocation.publish_user_state(redis, everywhere.user_id, later)

    disabled = _key_principal()
    await revocation.publish_user_state(redis, disabled.user_id, revocation.GONE)

    key_revoked = _key_principal()
    assert key_revoked.key_id is not None
    await revocation.publish_user_state(redis, key_revoked.user_id, OK)
    await revocation.revoke_api_key(redis, key_revoked.key_id)

    for principal in (logged_out, family_revoked, everywhere, disabled, key_revoked):
        assert not await still_valid(redis, pool, principal), principal


async def test_a_user_not_cached_is_read_from_the_database(redis: aioredis.Redis, pool: asyncpg.Pool) -> None:
    # No such row: the account is gone, so its streams end.
    assert not await still_valid(redis, pool, _token_principal())


async def test_state_that_cannot_be_read_keeps_the_stream(pool: asyncpg.Pool) -> None:
    unreachable = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    try:
        for principal in (_token_principal(), _key_principal()):
            assert await still_valid(unreachable, pool, principal)
        # Even an expired token needs no state to be told: it ends without a read.
        assert not await still_valid(unreachable, pool, _token_principal(expires_in=-1))
    finally:
        await unreachable.aclose()
