"""All SQL that touches users and their refresh tokens."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import RefreshToken, User


async def create(session: AsyncSession, email: str, password_hash: str) -> User | None:
    """Insert a user; None when the email is taken (no exception, so the transaction stays usable)."""
    stmt = (
        insert(User)
        .values(id=uuid.uuid4(), email=email, password_hash=password_hash)
        .on_conflict_do_nothing(index_elements=[User.email])
        .returning(User)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def by_email(session: AsyncSession, email: str) -> User | None:
    return (await session.execute(select(User).where(User.email == email))).scalar_one_or_none()


async def by_id(session: AsyncSession, user_id: uuid.UUID) -> User | None:
    return await session.get(User, user_id)


async def store_refresh_token(session: AsyncSession, jti: uuid.UUID, user_id: uuid.UUID, expires_at: datetime) -> None:
    session.add(RefreshToken(jti=jti, user_id=user_id, expires_at=expires_at))
    await session.flush()


async def revoke_refresh_token(session: AsyncSession, jti: uuid.UUID, user_id: uuid.UUID) -> bool:
    """Revoke a live token; False when it was unknown or already revoked (a replay)."""
    stmt = (
        update(RefreshToken)
        .where(RefreshToken.jti == jti, RefreshToken.user_id == user_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=func.now())
        .returning(RefreshToken.jti)
    )
    return (await session.execute(stmt)).one_or_none() is not None


async def revoke_all_refresh_tokens(session: AsyncSession, user_id: uuid.UUID) -> None:
    stmt = (
        update(RefreshToken)
        .where(RefreshToken.user_id == user_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=func.now())
    )
    await session.execute(stmt)
