"""Password hashing (bcrypt) and JSON Web Tokens (PyJWT), per RFC 8725."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import bcrypt
import jwt

from shared.config import Settings
from shared.errors import Unauthorized

# bcrypt only reads the first 72 bytes; longer passwords are rejected, never truncated.
BCRYPT_MAX_BYTES = 72
TokenKind = Literal["access", "refresh"]
# Explicit typing (RFC 8725 §3.11) keeps one kind of token from standing in for the other.
_TOKEN_TYP: dict[TokenKind, str] = {"access": "at+jwt", "refresh": "refresh+jwt"}
_REQUIRED_CLAIMS = ["exp", "iat", "sub", "aud", "iss", "jti"]


def password_fits(password: str) -> bool:
    """Whether bcrypt can hash this password without silently dropping bytes."""
    return len(password.encode("utf-8")) <= BCRYPT_MAX_BYTES


def hash_password(password: str, rounds: int) -> str:
    """bcrypt hash; callers must have checked `password_fits`."""
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds)).decode("ascii")


def verify_password(password: str, password_hash: str) -> bool:
    """Constant-time check; a password bcrypt cannot take is simply wrong."""
    if not password_fits(password):
        return False
    return bcrypt.checkpw(password.encode("utf-8"), password_hash.encode("ascii"))


def _stamp_now() -> datetime:
    """Now as tokens stamp it (`iat`): milliseconds, floored."""
    return datetime.fromtimestamp(math.floor(datetime.now(UTC).timestamp() * 1000) / 1000, UTC)


def sessions_cutoff() -> datetime:
    """The instant "log out everywhere" moves `sessions_valid_after` to: 1 ms after the `iat` of every token
    stamped so far (so the caller's own is refused, even one issued this very millisecond). A token stamped
    from it on is accepted; `wait_for_cutoff` makes sure the process's clock has reached it."""
    return _stamp_now() + timedelta(milliseconds=1)


async def wait_for_cutoff(cutoff: datetime) -> None:
    """Sleep (at most 1 ms) until tokens stamped here are no longer before `cutoff`: a login or a pair issued
    after this returns is accepted."""
    # Bounded, so a clock stepped back by NTP costs no long sleep.
    for _ in range(3):
        left = (cutoff - datetime.now(UTC)).total_seconds()
        if left <= 0:
            return
        await asyncio.sleep(min(left, 0.002))


@dataclass(frozen=True, slots=True)
class TokenClaims:
    user_id: uuid.UUID
    jti: uuid.UUID
    expires_at: datetime
    issued_at: datetime
    # The refresh-token family (one login and its rotations); None in tokens issued before families existed.
    family_id: uuid.UUID | None = None


def issue_token(
    settings: Settings, user_id: uuid.UUID, kind: TokenKind, family_id: uuid.UUID | None = None
) -> tuple[str, TokenClaims]:
    """Sign a token of the given kind; returns it with the claims worth storing."""
    # `iat` is compared with a user's revocation instant (`sessions_valid_after`), so it keeps milliseconds
    # (RFC 7519 allows a fractional NumericDate), floored: a token issued in the same second as a disable
    # is told apart from one issued just after a re-enable. `exp` and `nbf` stay whole seconds.
    now = _stamp_now()
    ttl = settings.access_token_ttl_seconds if kind == "access" else settings.refresh_token_ttl_seconds
    claims = TokenClaims(
        user_id=user_id,
        jti=uuid.uuid4(),
        expires_at=now + timedelta(seconds=ttl),
        issued_at=now,
        family_id=family_id,
    )
    payload: dict[str, Any] = {
        "sub": str(user_id),
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "iat": now.timestamp(),
        "nbf": now,
        "exp": claims.expires_at,
        "jti": str(claims.jti),
    }
    if family_id is not None:
        payload["fam"] = str(family_id)
    token = jwt.encode(
        payload,
        settings.jwt_secret_key.get_secret_value(),
        algorithm=settings.jwt_algorithm,
        headers={"typ": _TOKEN_TYP[kind]},
    )
    return token, claims


class _VerifiedTokens:
    """Claims of recently verified tokens, so a polling client does not pay for HMAC and JSON each time.

    Only fully verified tokens enter; expiry is still checked on every use. Bounded, oldest out first.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._claims: OrderedDict[tuple[str, str, TokenKind], TokenClaims] = OrderedDict()

    def get(self, key: tuple[str, str, TokenKind]) -> TokenClaims | None:
        claims = self._claims.get(key)
        if claims is not None and claims.expires_at <= datetime.now(UTC):
            self._claims.pop(key, None)
            return None
        return claims

    def put(self, key: tuple[str, str, TokenKind], claims: TokenClaims) -> None:
        self._claims[key] = claims
        if len(self._claims) > self._size:
            self._claims.popitem(last=False)


_verified = _VerifiedTokens(size=10_000)


def decode_token(settings: Settings, token: str, kind: TokenKind) -> TokenClaims:
    """Verify signature, algorithm, type, issuer, audience and times; any doubt is a 401."""
    # The cache key includes every accepted secret: retiring a key retires what it verified.
    secrets = (settings.jwt_secret_key, *settings.jwt_previous_secret_keys)
    key = (token, "\x00".join(s.get_secret_value() for s in secrets), kind)
    cached = _verified.get(key)
    if cached is not None:
        return cached
    claims = _decode(settings, token, kind)
    _verified.put(key, claims)
    return claims


def _verify(settings: Settings, token: str) -> dict[str, Any]:
    """Check the signature with the current key, then with each previous one (a rotation in progress)."""
    keys = [settings.jwt_secret_key, *settings.jwt_previous_secret_keys]
    for index, key in enumerate(keys):
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                key.get_secret_value(),
                algorithms=[settings.jwt_algorithm],
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                options={"require": _REQUIRED_CLAIMS, "strict_aud": True},
                leeway=5,
            )
            return payload
        except jwt.InvalidSignatureError:
            if index == len(keys) - 1:
                raise
    raise AssertionError("unreachable")


def _decode(settings: Settings, token: str, kind: TokenKind) -> TokenClaims:
    try:
        header = jwt.get_unverified_header(token)
        if header.get("typ") != _TOKEN_TYP[kind]:
            raise Unauthorized("Invalid token", code="invalid_token")
        payload = _verify(settings, token)
        family = payload.get("fam")
        return TokenClaims(
            user_id=uuid.UUID(payload["sub"]),
            jti=uuid.UUID(payload["jti"]),
            expires_at=datetime.fromtimestamp(payload["exp"], UTC),
            issued_at=datetime.fromtimestamp(payload["iat"], UTC),
            family_id=uuid.UUID(family) if family is not None else None,
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("Token expired", code="token_expired") from exc
    except (jwt.InvalidTokenError, ValueError, TypeError, KeyError, AttributeError, OverflowError, OSError) as exc:
        raise Unauthorized("Invalid token", code="invalid_token") from exc
