"""Registration, login, refresh-token rotation and logout. Services flush; the caller commits."""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from shared.config import Settings
from shared.errors import Conflict, Unauthorized
from shared.models import User
from shared.password_policy import check_password
from shared.repositories import users as users_repo
from shared.schemas import TokenPair
from shared.security import decode_token, hash_password, issue_token, verify_password

INVALID_CREDENTIALS = "Incorrect email or password"


class RefreshTokenReused(Unauthorized):
    """A spent refresh token came back. The caller must commit the family revocation before answering."""

    def __init__(self) -> None:
        super().__init__("Refresh token is no longer valid", code="invalid_token")


def normalize_email(email: str) -> str:
    return email.strip().lower()


async def register(session: AsyncSession, settings: Settings, email: str, password: str) -> User:
    """Create a user; 409 when the email is taken, 422 (with the rule's code) when the password is refused."""
    check_password(password, email, settings.password_min_length)
    # bcrypt is CPU-bound for ~0.2 s: keep the event loop free.
    password_hash = await asyncio.to_thread(hash_password, password, settings.bcrypt_rounds)
    user = await users_repo.create(session, normalize_email(email), password_hash)
    if user is None:
        raise Conflict("Email already registered", code="email_taken")
    return user


_dummy_hashes: dict[int, str] = {}


def _dummy_hash(rounds: int) -> str:
    # Checking a dummy hash for unknown users keeps both 401s equally slow. Built on first use inside the
    # worker thread (a race builds it twice, harmlessly), never on the event loop: it costs a whole bcrypt.
    if rounds not in _dummy_hashes:
        _dummy_hashes[rounds] = hash_password(uuid.uuid4().hex, rounds)
    return _dummy_hashes[rounds]


def _check_unknown_user(password: str, rounds: int) -> bool:
    verify_password(password, _dummy_hash(rounds))
    return False


async def authenticate(session: AsyncSession, settings: Settings, email: str, password: str) -> User:
    """The user for these credentials; one message for unknown email and wrong password."""
    user = await users_repo.by_email(session, normalize_email(email))
    # bcrypt is CPU-bound for ~0.2 s: it runs in a thread, for known and unknown users alike.
    if user is None:
        ok = await asyncio.to_thread(_check_unknown_user, password, settings.bcrypt_rounds)
    else:
        ok = await asyncio.to_thread(verify_password, password, user.password_hash)
    if user is None or not ok:
        raise Unauthorized(INVALID_CREDENTIALS, code="invalid_credentials")
    return user


async def issue_pair(session: AsyncSession, settings: Settings, user_id: uuid.UUID) -> TokenPair:
    """A fresh access token and a refresh token recorded for later revocation."""
    access, _ = issue_token(settings, user_id, "access")
    refresh, claims = issue_token(settings, user_id, "refresh")
    await users_repo.store_refresh_token(session, claims.jti, user_id, claims.expires_at)
    return TokenPair(access_token=access, expires_in=settings.access_token_ttl_seconds, refresh_token=refresh)


async def refresh(session: AsyncSession, settings: Settings, refresh_token: str) -> TokenPair:
    """Rotate: the presented token is spent; presenting a spent one revokes the whole family."""
    claims = decode_token(settings, refresh_token, "refresh")
    if not await users_repo.revoke_refresh_token(session, claims.jti, claims.user_id):
        # Reuse of a rotated token means it leaked: cut every session of this user.
        await users_repo.revoke_all_refresh_tokens(session, claims.user_id)
        raise RefreshTokenReused
    return await issue_pair(session, settings, claims.user_id)


async def logout(session: AsyncSession, settings: Settings, user_id: uuid.UUID, refresh_token: str) -> None:
    """Revoke the given refresh token of this user (access tokens expire on their own)."""
    claims = decode_token(settings, refresh_token, "refresh")
    if claims.user_id != user_id:
        raise Unauthorized("Refresh token does not belong to this user", code="invalid_token")
    await users_repo.revoke_refresh_token(session, claims.jti, user_id)
