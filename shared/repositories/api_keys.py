"""API keys: create, list, revoke (AsyncSession)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import ApiKey


async def create(
    session: AsyncSession, user_id: uuid.UUID, name: str, prefix: str, secret_hash: str, scopes: list[str]
) -> ApiKey:
    key = ApiKey(id=uuid.uuid4(), user_id=user_id, name=name, prefix=prefix, secret_hash=secret_hash, scopes=scopes)
    session.add(key)
    await session.flush()
    await session.refresh(key)
    return key


async def count_live(session: AsyncSession, user_id: uuid.UUID) -> int:
    stmt = select(func.count()).select_from(ApiKey).where(ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
    return int((await session.execute(stmt)).scalar_one())


async def list_live(session: AsyncSession, user_id: uuid.UUID) -> Sequence[ApiKey]:
    stmt = (
        select(ApiKey)
        .where(ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.created_at.desc(), ApiKey.id)
    )
    return (await session.execute(stmt)).scalars().all()


async def revoke(session: AsyncSession, user_id: uuid.UUID, key_id: uuid.UUID) -> bool:
    """Revoke one of this user's live keys; False when there is none (another user's key included)."""
    stmt = (
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=func.now())
        .returning(ApiKey.id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None
