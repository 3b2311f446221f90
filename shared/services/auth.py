"""Registration, login, refresh-token rotation, logout (here or everywhere) and password change. Services flush;
the caller commits."""

from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncSession

from shared import revocation
from shared.config import Settings
from shared.errors import AppError, Conflict, Forbidden, InvalidInput, Unauthorized
from shared.limits import Limiter
from shared.models import RevokedReason, User
from shared.password_policy import check_password
from shared.repositories import users as users_repo
from shared.schemas import TokenPair
from shared.security import (
    TokenClaims,
    decode_token,
    hash_password,
    issue_token,
    sessions_cutoff,
    verify_password,
    wait_for_cutoff,
)
from shared.services import credentials

INVALID_CREDENTIALS = "Incorrect email or password"
# Security events (token reuse, accounts disabled) go to their own logger, so they can be routed and alerted on.
security_log = logging.getLogger("aiq.security")


class RefreshTokenReused(Unauthorized):
    """A rotated refresh token came back. The caller must commit the family revocation before answering."""

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
    if user.disabled_at is not None:
        # Said only to whoever knows the password.
        raise Forbidden("This account is disabled", code="account_disabled")
    return user


async def issue_pair(
    session: AsyncSession, settings: Settings, user_id: uuid.UUID, family_id: uuid.UUID | None = None
) -> TokenPair:
    """A fresh access token and a refresh token recorded for later revocation; a login starts a new family."""
    family_id = family_id or uuid.uuid4()
    access, _ = issue_token(settings, user_id, "access", family_id)
    refresh, claims = issue_token(settings, user_id, "refresh", family_id)
    await users_repo.store_refresh_token(session, claims.jti, user_id, family_id, claims.expires_at)
    return TokenPair(access_token=access, expires_in=settings.access_token_ttl_seconds, refresh_token=refresh)


async def refresh(
    session: AsyncSession, settings: Settings, redis: aioredis.Redis, pool: asyncpg.Pool, refresh_token: str
) -> TokenPair:
    """Rotate within the token's family; a rotated token presented again revokes that family (theft)."""
    claims = decode_token(settings, refresh_token, "refresh")
    family_id = await users_repo.rotate_refresh_token(session, claims.jti, claims.user_id)
    if family_id is None:
        spent = await users_repo.refresh_token(session, claims.jti)
        if spent is not None and spent.user_id == claims.user_id and spent.revoked_reason == RevokedReason.ROTATED:
            # Two parties hold this family's tokens: cut the family (refresh and access tokens), nothing else.
            await users_repo.revoke_family(session, spent.family_id, RevokedReason.REUSE)
            await revocation.revoke_families(redis, settings, spent.family_id)
            security_log.warning(
                "refresh token reuse: family revoked",
                extra={
                    "event": "refresh_token_reuse",
                    "user_id": str(claims.user_id),
                    "family_id": str(spent.family_id),
                },
            )
            raise RefreshTokenReused
        # Logged out, cut with its family, disabled or unknown: invalid, not theft.
        raise Unauthorized("Refresh token is no longer valid", code="invalid_token")
    await credentials.check_user_active(redis, pool, claims.user_id)
    return await issue_pair(session, settings, claims.user_id, family_id)


async def logout(
    session: AsyncSession,
    settings: Settings,
    redis: aioredis.Redis,
    access: TokenClaims,
    refresh_token: str | None,
) -> None:
    """Revoke the presented access token at once and its refresh family (and that of `refresh_token`)."""
    families = {access.family_id} if access.family_id is not None else set()
    if refresh_token is not None:
        claims = decode_token(settings, refresh_token, "refresh")
        stored = await users_repo.refresh_token(session, claims.jti)
        if claims.user_id != access.user_id or stored is None or stored.user_id != access.user_id:
            raise Unauthorized("Refresh token does not belong to this user", code="invalid_token")
        families.add(stored.family_id)
    # Redis first: if the commit then fails, the tokens are revoked anyway (the safe direction).
    await revocation.revoke_access_token(redis, access.jti, access.expires_at)
    await revocation.revoke_families(redis, settings, *families)
    for family_id in families:
        await users_repo.revoke_family(session, family_id, RevokedReason.LOGOUT)


async def _end_sessions(
    session: AsyncSession,
    settings: Settings,
    redis: aioredis.Redis,
    user_id: uuid.UUID,
    reason: RevokedReason,
    password_hash: str | None = None,
) -> None:
    """Refuse every access token issued until now and every refresh token of the user; API keys are untouched.
    `password_hash`: the new password's, written in the same UPDATE.

    The rows are written first (the user's row stays locked until the commit, so a concurrent admin disable
    publishes its state after this one), then Redis, as logout does: if Redis cannot be written this raises a 503
    and the caller rolls back; if the commit fails after, the tokens are refused anyway (the safe direction).
    Returns once a token issued by this process would be accepted (`wait_for_cutoff`).
    """
    cutoff = sessions_cutoff()
    user = await users_repo.end_sessions(session, user_id, cutoff, password_hash)
    if user is None:
        raise Unauthorized("This account is disabled", code="account_disabled")
    families = await users_repo.revoke_all_refresh_tokens(session, user_id, reason)
    # `sessions_valid_after` alone refuses the access tokens; the families' markers also refuse those stamped by
    # an API process whose clock runs ahead of this one's.
    await revocation.revoke_families(redis, settings, *families)
    state = revocation.UserState(disabled=user.disabled_at is not None, sessions_valid_after=cutoff)
    await revocation.publish_user_state(redis, user_id, state)
    security_log.info(
        "sessions ended", extra={"event": "sessions_ended", "user_id": str(user_id), "reason": reason.value}
    )
    await wait_for_cutoff(cutoff)


async def logout_everywhere(
    session: AsyncSession, settings: Settings, redis: aioredis.Redis, user_id: uuid.UUID
) -> None:
    """End every session of the user (access and refresh tokens, on every API process at once); API keys stay."""
    await _end_sessions(session, settings, redis, user_id, RevokedReason.LOGOUT_ALL)


async def change_password(
    session: AsyncSession,
    settings: Settings,
    redis: aioredis.Redis,
    limiter: Limiter,
    address: str,
    user_id: uuid.UUID,
    current_password: str,
    new_password: str,
) -> TokenPair:
    """Check the current password (throttled as a login, on the same counters), set the new one, end every session
    and start a new one: the pair returned keeps the caller logged in."""
    user = await users_repo.by_id(session, user_id)
    if user is None:
        raise Unauthorized("This account is disabled", code="account_disabled")
    await limiter.login_attempt(user.email, address)
    if not await asyncio.to_thread(verify_password, current_password, user.password_hash):
        raise AppError("Current password is incorrect", status_code=400, code="invalid_current_password")
    await limiter.login_succeeded(user.email, address)
    if new_password == current_password:
        message = "The new password must differ from the current one"
        raise InvalidInput(
            message,
            code="password_unchanged",
            details=[{"loc": ["body", "new_password"], "msg": message, "type": "password_unchanged"}],
        )
    check_password(new_password, user.email, settings.password_min_length, field="new_password")
    password_hash = await asyncio.to_thread(hash_password, new_password, settings.bcrypt_rounds)
    await _end_sessions(session, settings, redis, user_id, RevokedReason.PASSWORD_CHANGED, password_hash)
    return await issue_pair(session, settings, user_id)
