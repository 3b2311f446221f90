"""All SQL that touches users and their refresh tokens (AsyncSession)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import RefreshToken, RevokedReason, Role, User


async def create(session: AsyncSession, email: str, password_hash: str, role: Role = Role.USER) -> User | None:
    """Insert a user; None when the email is taken (no exception, so the transaction stays usable)."""
    stmt = (
        insert(User)
        .values(id=uuid.uuid4(), email=email, password_hash=password_hash, role=role.value)
        .on_conflict_do_nothing(index_elements=[User.email])
        .returning(User)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def by_email(session: AsyncSession, email: str) -> User | None:
    return (await session.execute(select(User).where(User.email == email))).scalar_one_or_none()


async def by_id(session: AsyncSession, user_id: uuid.UUID) -> User | None:
    return await session.get(User, user_id)


async def end_sessions(
    session: AsyncSession, user_id: uuid.UUID, cutoff: datetime, password_hash: str | None = None
) -> User | None:
    """Move the user's revocation instant to `cutoff`, and set a new password hash with it when one is given (row
    locked until the commit); None for an unknown user."""
    values: dict[str, object] = {"sessions_valid_after": cutoff}
    if password_hash is not None:
        values["password_hash"] = password_hash
    stmt = update(User).where(User.id == user_id).values(values).returning(User)
    return (await session.execute(stmt)).scalar_one_or_none()


async def set_role_and_password(session: AsyncSession, user_id: uuid.UUID, role: Role, password_hash: str) -> None:
    await session.execute(update(User).where(User.id == user_id).values(role=role.value, password_hash=password_hash))


async def search(
    session: AsyncSession, text: str | None, role: Role | None, limit: int, offset: int
) -> tuple[Sequence[User], int]:
    """Users whose email contains `text` (case-insensitive), oldest first, with the total that match."""
    conditions: list[ColumnElement[bool]] = []
    if text:
        escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conditions.append(User.email.like(f"%{escaped}%", escape="\\"))
    if role is not None:
        conditions.append(User.role == role.value)
    total = (await session.execute(select(func.count()).select_from(User).where(*conditions))).scalar_one()
    rows = await session.execute(
        select(User).where(*conditions).order_by(User.created_at, User.id).limit(limit).offset(offset)
    )
    return rows.scalars().all(), int(total)


async def set_disabled(session: AsyncSession, user_id: uuid.UUID, disabled: bool) -> User | None:
    """Disable (and move the session revocation instant to now) or enable; None for an unknown user."""
    values: dict[str, object] = (
        {"disabled_at": func.coalesce(User.disabled_at, func.now()), "sessions_valid_after": func.now()}
        if disabled
        else {"disabled_at": None}
    )
    stmt = update(User).where(User.id == user_id).values(**values).returning(User)
    return (await session.execute(stmt)).scalar_one_or_none()


async def store_refresh_token(
    session: AsyncSession, jti: uuid.UUID, user_id: uuid.UUID, family_id: uuid.UUID, expires_at: datetime
) -> None:
    session.add(RefreshToken(jti=jti, user_id=user_id, family_id=family_id, expires_at=expires_at))
    await session.flush()


async def rotate_refresh_token(session: AsyncSession, jti: uuid.UUID, user_id: uuid.UUID) -> uuid.UUID | None:
    """Spend a live token; its family id, or None when it was unknown or already revoked."""
    stmt = (
        update(RefreshToken)
        .where(RefreshToken.jti == jti, RefreshToken.user_id == user_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=func.now(), revoked_reason=RevokedReason.ROTATED.value)
        .returning(RefreshToken.family_id)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def refresh_token(session: AsyncSession, jti: uuid.UUID) -> RefreshToken | None:
    return await session.get(RefreshToken, jti)


async def revoke_family(session: AsyncSession, family_id: uuid.UUID, reason: RevokedReason) -> None:
    stmt = (
        update(RefreshToken)
        .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=func.now(), revoked_reason=reason.value)
    )
    await session.execute(stmt)


async def revoke_all_refresh_tokens(session: AsyncSession, user_id: uuid.UUID, reason: RevokedReason) -> set[uuid.UUID]:
    """Revoke every live refresh token of the user; the families of those not yet expired."""
    stmt = (
        update(RefreshToken)
        .where(RefreshToken.user_id == user_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=func.now(), revoked_reason=reason.value)
        .returning(RefreshToken.family_id, RefreshToken.expires_at)
    )
    now = datetime.now(UTC)
    return {family_id for family_id, expires_at in await session.execute(stmt) if expires_at > now}
