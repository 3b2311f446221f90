"""Logging out everywhere and changing the password: every token session ends at once, on every API process;
API keys stay; a bad request changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.engine import Engine

from devkit.procs import free_port
from tests.support.api import TEST_PASSWORD, register_and_login
from tests.support.stack import Stack, spawn_api, stop

NEW_PASSWORD = "a brand new passphrase, 2027"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _login(client: httpx.Client, email: str, password: str = TEST_PASSWORD) -> httpx.Response:
    return client.post("/api/v1/auth/login", json={"email": email, "password": password})


def _code(r: httpx.Response, status: int = 401) -> str:
    assert r.status_code == status, r.text
    return str(r.json()["error"]["code"])


def _me(client: httpx.Client, token: str) -> httpx.Response:
    return client.get("/api/v1/users/me", headers=_bearer(token))


def _refresh(client: httpx.Client, token: str) -> httpx.Response:
    return client.post("/api/v1/auth/refresh", json={"refresh_token": token})


def _change(client: httpx.Client, token: str, current: str, new: str) -> httpx.Response:
    body = {"current_password": current, "new_password": new}
    return client.post("/api/v1/auth/password", json=body, headers=_bearer(token))


def _account(db: Engine, user_id: str) -> tuple[str, Any, list[tuple[Any, Any]]]:
    """(password hash, sessions_valid_after, [(revoked_at, revoked_reason)] of its refresh tokens)."""
    with db.connect() as conn:
        password_hash, valid_after = conn.execute(
            text("SELECT password_hash, sessions_valid_after FROM users WHERE id = :id"), {"id": user_id}
        ).one()
        tokens = conn.execute(
            text("SELECT revoked_at, revoked_reason FROM refresh_tokens WHERE user_id = :id"), {"id": user_id}
        ).all()
    return password_hash, valid_after, [tuple(t) for t in tokens]


def test_logout_all_ends_every_token_session_on_every_api_process_and_keeps_api_keys(
    client: httpx.Client, stack: Stack, db: Engine, user: dict[str, Any], tmp_path: Path
) -> None:
    other = _login(client, user["email"]).json()
    key = client.post("/api/v1/keys", json={"name": "k"}, headers=user["headers"]).json()["key"]
    access, refresh = user["tokens"]["access_token"], user["tokens"]["refresh_token"]
    proc, url = spawn_api(stack, tmp_path / "api-2.log")
    try:
        with httpx.Client(base_url=url, timeout=10) as second:
            # The second process has verified (and cached) both tokens before.
            assert _me(second, access).status_code == 200
            assert _me(second, other["access_token"]).status_code == 200
            assert client.post("/api/v1/auth/logout-all", headers=user["headers"]).status_code == 204
            for api in (client, second):
                for token in (access, other["access_token"]):
                    assert _code(_me(api, token)) == "token_revoked"
                    assert _code(api.post("/api/v1/query", json={"query": "hi"}, headers=_bearer(token))) == (
                        "token_revoked"
                    )
                # API keys are separate credentials: they keep working.
                assert api.get("/api/v1/query", headers=_bearer(key)).status_code == 200
            for token in (refresh, other["refresh_token"]):
                assert _code(_refresh(client, token)) == "invalid_token"
            # A login right after is a new session, accepted at once on both processes (and by a submit's check).
            fresh = _login(second, user["email"]).json()
            for api in (client, second):
                assert _me(api, fresh["access_token"]).status_code == 200
            r = client.post("/api/v1/query", json={"query": "after"}, headers=_bearer(fresh["access_token"]))
            assert r.status_code == 202, r.text
            assert _refresh(second, fresh["refresh_token"]).status_code == 200
    finally:
        stop(proc)
    _, valid_after, tokens = _account(db, user["user_id"])
    assert valid_after is not None
    assert [reason for _, reason in tokens].count("logout_all") == 2
    # Presenting an ended refresh token is not theft: no reuse alarm.
    logged = [line for line in stack.read_logs().splitlines() if user["user_id"] in line]
    assert not [line for line in logged if "refresh_token_reuse" in line]
    assert [line for line in logged if "sessions_ended" in line]


def test_a_login_immediately_after_logout_all_is_accepted_and_the_token_before_it_is_not(
    client: httpx.Client, user: dict[str, Any]
) -> None:
    # Tokens carry `iat` in milliseconds: each round puts a login and a logout-all within a few of them.
    token = user["tokens"]["access_token"]
    for _ in range(5):
        assert client.post("/api/v1/auth/logout-all", headers=_bearer(token)).status_code == 204
        assert _code(_me(client, token)) == "token_revoked"
        r = _login(client, user["email"])
        assert r.status_code == 200, r.text
        token = r.json()["access_token"]
        assert _me(client, token).status_code == 200


def test_logout_all_and_password_change_need_an_access_token(client: httpx.Client, user: dict[str, Any]) -> None:
    key = client.post("/api/v1/keys", json={"name": "k"}, headers=user["headers"]).json()["key"]
    r = client.post("/api/v1/auth/logout-all", headers=_bearer(key))
    assert _code(r, 403) == "access_token_required"
    assert _code(_change(client, key, TEST_PASSWORD, NEW_PASSWORD), 403) == "access_token_required"
    assert _code(client.post("/api/v1/auth/logout-all")) == "not_authenticated"
    assert _me(client, user["tokens"]["access_token"]).status_code == 200


def test_a_wrong_current_password_changes_nothing(client: httpx.Client, db: Engine, user: dict[str, Any]) -> None:
    before = _account(db, user["user_id"])
    r = _change(client, user["tokens"]["access_token"], "not my password", NEW_PASSWORD)
    assert _code(r, 400) == "invalid_current_password"
    # A 400, not a 401: the access token is fine, and clients drop a token that hears 401.
    assert "www-authenticate" not in r.headers
    assert _account(db, user["user_id"]) == before
    assert _me(client, user["tokens"]["access_token"]).status_code == 200
    assert _login(client, user["email"]).status_code == 200
    assert _code(_login(client, user["email"], NEW_PASSWORD)) == "invalid_credentials"


def test_a_refused_new_password_changes_nothing(client: httpx.Client, db: Engine, user: dict[str, Any]) -> None:
    before = _account(db, user["user_id"])
    access = user["tokens"]["access_token"]
    for new, code in (
        ("x7#q!", "password_too_short"),
        ("password123", "password_too_common"),
        (user["email"], "password_matches_email"),
        ("é" * 37, "password_too_long"),
        (TEST_PASSWORD, "password_unchanged"),
    ):
        r = _change(client, access, TEST_PASSWORD, new)
        assert _code(r, 422) == code
        assert r.json()["error"]["details"][0]["loc"] == ["body", "new_password"]
        assert new not in r.text
    for body in ({"current_password": TEST_PASSWORD}, {"current_password": "", "new_password": NEW_PASSWORD}):
        r = client.post("/api/v1/auth/password", json=body, headers=_bearer(access))
        assert _code(r, 422) == "validation_error"
    assert _account(db, user["user_id"]) == before
    assert _me(client, access).status_code == 200
    assert _refresh(client, user["tokens"]["refresh_token"]).status_code == 200


def test_changing_the_password_ends_every_session_and_returns_a_new_one(
    client: httpx.Client, stack: Stack, db: Engine, user: dict[str, Any]
) -> None:
    other = _login(client, user["email"]).json()
    key = client.post("/api/v1/keys", json={"name": "k"}, headers=user["headers"]).json()["key"]
    old_hash, _, _ = _account(db, user["user_id"])
    r = _change(client, user["tokens"]["access_token"], TEST_PASSWORD, NEW_PASSWORD)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    pair = r.json()
    assert set(pair) == {"access_token", "token_type", "expires_in", "refresh_token"}
    # The pair returned keeps this device logged in; every earlier token is refused.
    assert _me(client, pair["access_token"]).status_code == 200
    for token in (user["tokens"]["access_token"], other["access_token"]):
        assert _code(_me(client, token)) == "token_revoked"
    for token in (user["tokens"]["refresh_token"], other["refresh_token"]):
        assert _code(_refresh(client, token)) == "invalid_token"
    assert _refresh(client, pair["refresh_token"]).status_code == 200
    assert client.get("/api/v1/query", headers=_bearer(key)).status_code == 200
    # The old password no longer logs in; the new one does.
    assert _code(_login(client, user["email"])) == "invalid_credentials"
    assert _login(client, user["email"], NEW_PASSWORD).status_code == 200
    new_hash, _, tokens = _account(db, user["user_id"])
    assert new_hash != old_hash
    assert new_hash.startswith("$2")
    assert [reason for _, reason in tokens].count("password_changed") == 2
    assert NEW_PASSWORD not in stack.read_logs()


def test_redis_down_logout_all_and_password_change_answer_503_and_change_nothing(
    client: httpx.Client, stack: Stack, db: Engine, tmp_path: Path
) -> None:
    user = register_and_login(client)
    before = _account(db, user["user_id"])
    proc, url = spawn_api(stack, tmp_path / "api-no-redis.log", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            r = c.post("/api/v1/auth/logout-all", headers=user["headers"])
            assert _code(r, 503) == "auth_unavailable"
            assert r.headers["retry-after"]
            # The password check is throttled in Redis, as a login is: it cannot run either.
            r = _change(c, user["tokens"]["access_token"], TEST_PASSWORD, NEW_PASSWORD)
            assert r.status_code == 503, r.text
    finally:
        stop(proc)
    assert _account(db, user["user_id"]) == before
    assert _me(client, user["tokens"]["access_token"]).status_code == 200
    assert _login(client, user["email"]).status_code == 200
