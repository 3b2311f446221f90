"""Registration, login, tokens: every way in is checked strictly and fails with one JSON shape."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import httpx
import jwt
import pytest

from tests.support.api import TEST_PASSWORD, register_and_login
from tests.support.db import count_rows
from tests.support.stack import Stack


def _unauthorized(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    body: dict[str, Any] = r.json()["error"]
    assert body["code"]
    assert body["message"]
    return body


def test_register_returns_user_without_password(client: httpx.Client) -> None:
    email = f"New-{uuid.uuid4().hex[:8]}@Example.com"
    r = client.post("/api/v1/auth/register", json={"email": email, "password": TEST_PASSWORD})
    assert r.status_code == 201
    body = r.json()
    assert body["email"] == email.lower()
    assert set(body) == {"id", "email", "role", "created_at"}
    assert body["role"] == "user"


def test_register_taken_email_is_409_case_insensitively(client: httpx.Client, user: dict[str, Any]) -> None:
    r = client.post("/api/v1/auth/register", json={"email": user["email"].upper(), "password": TEST_PASSWORD})
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "email_taken"


def test_register_rejects_invalid_input(client: httpx.Client) -> None:
    for body in (
        {"email": "not-an-email", "password": TEST_PASSWORD},
        {"email": "a@example.com"},
        {"email": "a@example.com", "password": TEST_PASSWORD, "admin": True},
    ):
        r = client.post("/api/v1/auth/register", json=body)
        assert r.status_code == 422, body
        assert r.json()["error"]["code"] == "validation_error"


def test_password_over_72_bytes_is_rejected_not_truncated(client: httpx.Client, db: Any) -> None:
    email = f"long-{uuid.uuid4().hex[:8]}@example.com"
    # 40 two-byte characters: 40 characters but 80 bytes.
    r = client.post("/api/v1/auth/register", json={"email": email, "password": "é" * 40})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "password_too_long"
    assert count_rows(db, "SELECT count(*) FROM users WHERE email = :e", e=email) == 0


def test_password_of_exactly_72_bytes_works(client: httpx.Client) -> None:
    info = register_and_login(client, password="p" * 72)
    assert info["tokens"]["access_token"]


def test_login_with_overlong_password_is_plain_401(client: httpx.Client, user: dict[str, Any]) -> None:
    # Same 72-byte prefix as a valid password would match under silent truncation; it must not.
    r = client.post("/api/v1/auth/login", json={"email": user["email"], "password": TEST_PASSWORD + "x" * 100})
    assert _unauthorized(r)["code"] == "invalid_credentials"


def test_wrong_password_and_unknown_user_get_the_same_401(client: httpx.Client, user: dict[str, Any]) -> None:
    wrong = client.post("/api/v1/auth/login", json={"email": user["email"], "password": "wrong password!"})
    unknown = client.post("/api/v1/auth/login", json={"email": "nobody-x@example.com", "password": "whatever123"})
    assert _unauthorized(wrong) == _unauthorized(unknown)


def test_login_accepts_oauth2_form_and_json(client: httpx.Client, user: dict[str, Any]) -> None:
    form = client.post("/api/v1/auth/login", data={"username": user["email"], "password": TEST_PASSWORD})
    assert form.status_code == 200
    body = form.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] > 0
    assert body["refresh_token"]
    bad = client.post("/api/v1/auth/login", content=b"{nope", headers={"content-type": "application/json"})
    assert bad.status_code == 422


def test_me_needs_a_token(client: httpx.Client, user: dict[str, Any]) -> None:
    assert client.get("/api/v1/users/me", headers=user["headers"]).json()["email"] == user["email"]
    assert _unauthorized(client.get("/api/v1/users/me"))["code"] == "not_authenticated"


def _forge(stack: Stack, user_id: str, *, key: str | None = None, drop: str | None = None, **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user_id,
        "iss": stack.settings.jwt_issuer,
        "aud": stack.settings.jwt_audience,
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
    }
    claims.update(overrides)
    if drop:
        claims.pop(drop)
    secret = key or stack.settings.jwt_secret_key.get_secret_value()
    return jwt.encode(claims, secret, algorithm="HS256", headers={"typ": "at+jwt"})


def test_a_correctly_forged_token_is_accepted_so_the_rejections_below_mean_something(
    client: httpx.Client, stack: Stack, user: dict[str, Any]
) -> None:
    token = _forge(stack, user["user_id"])
    assert client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_bad_tokens_are_rejected(client: httpx.Client, stack: Stack, user: dict[str, Any]) -> None:
    uid = user["user_id"]
    access = user["tokens"]["access_token"]
    head, payload, sig = access.split(".")
    none_token = jwt.encode({"sub": uid, "exp": int(time.time()) + 60}, key=None, algorithm="none")  # type: ignore[arg-type]
    cases = {
        "tampered": f"{head}.{payload}.{sig[:-4]}AAAA",
        "alg none": none_token,
        "expired": _forge(stack, uid, exp=int(time.time()) - 60, iat=int(time.time()) - 600),
        "no exp": _forge(stack, uid, drop="exp"),
        "no sub": _forge(stack, uid, drop="sub"),
        "no iat": _forge(stack, uid, drop="iat"),
        "wrong audience": _forge(stack, uid, aud="someone-else"),
        "wrong issuer": _forge(stack, uid, iss="evil"),
        "wrong key": _forge(stack, uid, key="x" * 48),
        "refresh used as access": user["tokens"]["refresh_token"],
        "garbage": "not.a.jwt",
    }
    for name, token in cases.items():
        r = client.get("/api/v1/query", headers={"Authorization": f"Bearer {token}"})
        body = _unauthorized(r)
        assert body["code"] in {"invalid_token", "token_expired"}, name
    assert (
        _unauthorized(client.get("/api/v1/query", headers={"Authorization": "Basic abc"}))["code"]
        == "not_authenticated"
    )


def _access_claims(stack: Stack, user_id: str) -> dict[str, Any]:
    """Every claim `shared.security` requires (plus nbf, as `issue_token` sets it), all with the right values."""
    now = int(time.time())
    return {
        "sub": user_id,
        "iss": stack.settings.jwt_issuer,
        "aud": stack.settings.jwt_audience,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
    }


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).rstrip(b"=").decode()


def _me(client: httpx.Client, token: str) -> httpx.Response:
    return client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"})


def test_well_formed_access_tokens_with_another_algorithm_are_rejected(
    client: httpx.Client, stack: Stack, user: dict[str, Any]
) -> None:
    # The server signs and verifies with HS256 only; these tokens pass every other check (typ, claims, key).
    assert stack.settings.jwt_algorithm == "HS256"
    secret = stack.settings.jwt_secret_key.get_secret_value()
    claims = _access_claims(stack, user["user_id"])
    header = {"typ": "at+jwt"}

    # Control: the very same header and claims signed with HS256 and the same key get in.
    good = jwt.encode(claims, secret, algorithm="HS256", headers=header)
    r = _me(client, good)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == user["user_id"]

    _, good_payload, good_sig = good.split(".")
    forged = {
        "none": jwt.encode(claims, None, algorithm="none", headers=header),
        "HS384, right key": jwt.encode(claims, secret, algorithm="HS384", headers=header),
        "HS512, right key": jwt.encode(claims, secret, algorithm="HS512", headers=header),
        # Hand-made variants of "none": other spellings, and a valid HS256 signature left attached.
        "None": f"{_b64({'alg': 'None', 'typ': 'at+jwt'})}.{good_payload}.",
        "NONE": f"{_b64({'alg': 'NONE', 'typ': 'at+jwt'})}.{good_payload}.",
        "none with HS256 signature": f"{_b64({'alg': 'none', 'typ': 'at+jwt'})}.{good_payload}.{good_sig}",
    }
    for name, token in forged.items():
        head = jwt.get_unverified_header(token)
        # Only the algorithm differs from the accepted token: same typ, same payload.
        assert head["typ"] == "at+jwt", name
        assert head["alg"] != "HS256", name
        assert token.split(".")[1] == good_payload, name
        assert _unauthorized(_me(client, token))["code"] == "invalid_token", name
        r = client.get("/api/v1/query", headers={"Authorization": f"Bearer {token}"})
        assert _unauthorized(r)["code"] == "invalid_token", name
    # The genuine token still works afterwards: the rejections were about the algorithm, not some state.
    assert _me(client, good).status_code == 200


def test_access_token_cannot_be_used_as_refresh_token(client: httpx.Client, user: dict[str, Any]) -> None:
    r = client.post("/api/v1/auth/refresh", json={"refresh_token": user["tokens"]["access_token"]})
    _unauthorized(r)


def test_refresh_rotates_and_detects_reuse(client: httpx.Client, user: dict[str, Any]) -> None:
    first = user["tokens"]["refresh_token"]
    r = client.post("/api/v1/auth/refresh", json={"refresh_token": first})
    assert r.status_code == 200
    second = r.json()["refresh_token"]
    assert (
        client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {r.json()['access_token']}"}).status_code
        == 200
    )
    # Replaying the spent token is treated as theft: it fails and takes the newer one down with it.
    _unauthorized(client.post("/api/v1/auth/refresh", json={"refresh_token": first}))
    _unauthorized(client.post("/api/v1/auth/refresh", json={"refresh_token": second}))


def test_logout_revokes_the_refresh_token(client: httpx.Client, user: dict[str, Any]) -> None:
    refresh = user["tokens"]["refresh_token"]
    r = client.post("/api/v1/auth/logout", json={"refresh_token": refresh}, headers=user["headers"])
    assert r.status_code == 204
    _unauthorized(client.post("/api/v1/auth/refresh", json={"refresh_token": refresh}))


def test_logout_cannot_revoke_another_users_token(client: httpx.Client, user: dict[str, Any]) -> None:
    other = register_and_login(client)
    r = client.post(
        "/api/v1/auth/logout", json={"refresh_token": other["tokens"]["refresh_token"]}, headers=user["headers"]
    )
    _unauthorized(r)
    assert (
        client.post("/api/v1/auth/refresh", json={"refresh_token": other["tokens"]["refresh_token"]}).status_code == 200
    )


def test_tokens_signed_with_a_previous_key_verify_during_rotation() -> None:
    from shared.config import Settings
    from shared.errors import Unauthorized
    from shared.security import decode_token, issue_token

    old, new = "o" * 48, "n" * 48
    user_id = uuid.uuid4()
    before = Settings(environment="test", jwt_secret_key=old)  # type: ignore[arg-type]
    during = Settings(environment="test", jwt_secret_key=new, jwt_previous_secret_keys=old)  # type: ignore[arg-type]
    after = Settings(environment="test", jwt_secret_key=new)  # type: ignore[arg-type]
    token, _ = issue_token(before, user_id, "refresh")
    assert decode_token(during, token, "refresh").user_id == user_id
    with pytest.raises(Unauthorized, match="Invalid token"):
        decode_token(after, token, "refresh")
    # New tokens are signed with the new key only.
    fresh, _ = issue_token(during, user_id, "access")
    assert decode_token(after, fresh, "access").user_id == user_id
