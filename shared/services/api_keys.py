"""API keys for machine clients: the secret is shown once, only its SHA-256 is stored."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncSession

from shared import revocation
from shared.errors import Conflict, NotFound
from shared.models import ApiKey
from shared.repositories import api_keys as repo
from shared.services import credentials

MAX_LIVE_KEYS_PER_USER = 25
# `aiq_` + 43 URL-safe characters: 256 bits from the OS's CSPRNG; secret scanners can match the prefix.
_SECRET_BYTES = 32
_SHOWN_PREFIX_CHARS = len(credentials.API_KEY_PREFIX) + 8


def new_secret() -> str:
    return credentials.API_KEY_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)


async def create(session: AsyncSession, user_id: uuid.UUID, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
    """A new key and its secret (returned this once, never stored)."""
    if await repo.count_live(session, user_id) >= MAX_LIVE_KEYS_PER_USER:
        raise Conflict(f"At most {MAX_LIVE_KEYS_PER_USER} API keys per user; revoke one first", code="too_many_keys")
    secret = new_secret()
    key = await repo.create(
        session, user_id, name, secret[:_SHOWN_PREFIX_CHARS], credentials.hash_api_key(secret), sorted(set(scopes))
    )
    return key, secret


async def list_keys(session: AsyncSession, user_id: uuid.UUID) -> Sequence[ApiKey]:
    return await repo.list_live(session, user_id)


async def revoke(session: AsyncSession, redis: aioredis.Redis, user_id: uuid.UUID, key_id: uuid.UUID) -> None:
    """Revoke one of the caller's keys; every API process refuses it from its next request on."""
    if not await repo.revoke(session, user_id, key_id):
        raise NotFound("API key not found", code="api_key_not_found")
    # Before the commit: a failed commit leaves the key refused for a while, never usable after a 204.
    await revocation.revoke_api_key(redis, key_id)
    credentials.forget_api_key(key_id)
