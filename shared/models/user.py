import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, String, func
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base


class Role(StrEnum):
    USER = "user"
    ADMIN = "admin"


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    # Stored lower-cased; uniqueness is therefore case-insensitive.
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16), default=Role.USER.value, server_default=Role.USER.value)
    # Set while the account is disabled: its tokens and API keys stop working.
    disabled_at: Mapped[datetime | None]
    # Access tokens issued before this instant are refused (set when the account is disabled, when its user logs
    # out everywhere or changes their password).
    sessions_valid_after: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())

    __table_args__ = (CheckConstraint(f"role IN ('{Role.USER}', '{Role.ADMIN}')", name="role_known"),)


class RevokedReason(StrEnum):
    ROTATED = "rotated"  # spent by a refresh: presenting it again is reuse (theft)
    LOGOUT = "logout"  # its family logged out: presenting it again is merely invalid
    REUSE = "reuse"  # its family was cut after a rotated token came back
    DISABLED = "disabled"  # its user was disabled
    LOGOUT_ALL = "logout_all"  # its user logged out everywhere
    PASSWORD_CHANGED = "password_changed"  # noqa: S105 - a reason, not a password: its user changed theirs


class RefreshToken(Base):
    """One row per issued refresh token, so logout and rotation can revoke it.

    A family is the chain of refresh tokens rotated from one login; its access tokens carry its id (`fam`).
    """

    __tablename__ = "refresh_tokens"

    jti: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(index=True)
    family_id: Mapped[uuid.UUID] = mapped_column(index=True)
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    revoked_reason: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
