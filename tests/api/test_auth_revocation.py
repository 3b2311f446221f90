"""Revocation that works at once: logout, refresh-family reuse, state from PostgreSQL, Redis down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import text

from devkit.procs import free_port
from tests.support.api import TEST_PASSWORD, register_and_login
from tests.support.stack import Stack, spawn_api, stop


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _login(client: httpx.Client, email: str) -> dict[str, Any]:
    r = client.post("/api/v1/auth/login", json={"email": email, "password": TEST_PASSWORD})
    assert r.status_code == 200, r.text
    tokens: dict[str, Any] = r.json()
    return tokens


def _code(r: httpx.Response, status: int = 401) -> str:
    assert r.status_code == status, r.text
    return str(r.json()["error"]["code"])


def test_logout_revokes_the_access_token_at_once_and_its_family(
    client: httpx.Client, stack: Stack, user: dict[str, Any]
) -> None:
    other_session = _login(client, user["email"])
    access, refresh = user["tokens"]["access_token"], user["tokens"]["refresh_token"]
    assert client.get("/api/v1/users/me", headers=_bearer(access)).status_code == 200
    r = client.post("/api/v1/auth/logout", headers=_bearer(access))
    assert r.status_code == 204
    assert _code(client.get("/api/v1/users/me", headers=_bearer(access))) == "token_revoked"
    assert _code(client.get("/api/v1/query", headers=_bearer(access))) == "token_revoked"
    # The refresh token of the same login is dead too, as merely invalid: not reported as theft.
    assert _code(client.post("/api/v1/auth/refresh", json={"refresh_token": refresh})) == "invalid_token"
    assert "refresh_token_reuse" not in _lines_for(stack, user["user_id"])
    # Another login of the same user (another family) is untouched.
    assert client.get("/api/v1/users/me", headers=_bearer(other_session["access_token"])).status_code == 200
    r = client.post("/api/v1/auth/refresh", json={"refresh_token": other_session["refresh_token"]})
    assert r.status_code == 200


def _lines_for(stack: Stack, user_id: str) -> str:
    return "\n".join(line for line in stack.read_logs().splitlines() if user_id in line)


def test_reusing_a_rotated_refresh_token_revokes_that_family_only(
    client: httpx.Client, stack: Stack, user: dict[str, Any]
) -> None:
    family_a = user["tokens"]
    family_b = _login(client, user["email"])
    rotated = client.post("/api/v1/auth/refresh", json={"refresh_token": family_a["refresh_token"]})
    assert rotated.status_code == 200
    newest = rotated.json()
    assert client.get("/api/v1/users/me", headers=_bearer(newest["access_token"])).status_code == 200

    replay = client.post("/api/v1/auth/refresh", json={"refresh_token": family_a["refresh_token"]})
    assert _code(replay) == "invalid_token"
    # The family's newest refresh token and its access tokens (old and new) stop working.
    assert _code(client.post("/api/v1/auth/refresh", json={"refresh_token": newest["refresh_token"]})) == (
        "invalid_token"
    )
    for access in (newest["access_token"], family_a["access_token"]):
        assert _code(client.get("/api/v1/users/me", headers=_bearer(access))) == "token_revoked"
    # The user's other family goes on.
    assert client.get("/api/v1/users/me", headers=_bearer(family_b["access_token"])).status_code == 200
    assert client.post("/api/v1/auth/refresh", json={"refresh_token": family_b["refresh_token"]}).status_code == 200

    logged = _lines_for(stack, user["user_id"])
    assert "refresh_token_reuse" in logged
    assert "family_id" in logged
    for token in (family_a["refresh_token"], newest["refresh_token"], newest["access_token"]):
        assert token not in stack.read_logs()


def test_logout_with_a_foreign_refresh_token_changes_nothing(client: httpx.Client, user: dict[str, Any]) -> None:
    other = register_and_login(client)
    r = client.post(
        "/api/v1/auth/logout",
        json={"refresh_token": other["tokens"]["refresh_token"]},
        headers=user["headers"],
    )
    assert _code(r) == "invalid_token"
    assert client.get("/api/v1/users/me", headers=user["headers"]).status_code == 200
    assert client.post(
        "/api/v1/auth/refresh", json={"refresh_token": other["tokens"]["refresh_token"]}
    ).status_code == (200)


def test_user_state_comes_from_postgresql_when_redis_forgot_it(
    client: httpx.Client, stack: Stack, db: Any, user: dict[str, Any]
) -> None:
    r = redis.Redis.from_url(stack.settings.redis_url)
    key = f"aiq:auth:user:{user['user_id']}"
    assert client.get("/api/v1/users/me", headers=user["headers"]).status_code == 200
    assert r.get(key) is not None
    # An operator disables the row directly; Redis still says "ok" until the entry is dropped (a flush).
    _disable_in_database(db, user["user_id"])
    r.delete(key)
    assert _code(client.get("/api/v1/users/me", headers=user["headers"])) == "account_disabled"
    assert r.get(key) == b"disabled"
    r.close()


def _disable_in_database(db: Any, user_id: str) -> None:
    """An operator disables the row directly, behind the API's back (Redis keeps its cached state)."""
    with db.begin() as conn:
        conn.execute(
            text("UPDATE users SET disabled_at = now(), sessions_valid_after = now() WHERE id = :id"), {"id": user_id}
        )


def _submit(client: httpx.Client, token: str) -> httpx.Response:
    return client.post("/api/v1/query", json={"query": "hello"}, headers=_bearer(token))


def _rate_state(r: redis.Redis, stack: Stack, user_id: str) -> bytes | None:
    """The user's requests-per-minute state in Redis: every take moves it (a query's end does not)."""
    state: bytes | None = r.get(f"aiq:{stack.settings.queue_name}:lim:rpm:{user_id}")
    return state


def test_a_submit_reads_revocation_with_its_limits_and_a_revoked_token_takes_nothing(
    client: httpx.Client, stack: Stack, user: dict[str, Any]
) -> None:
    r = redis.Redis.from_url(stack.settings.redis_url)
    access = user["tokens"]["access_token"]
    assert _submit(client, access).status_code == 202
    held = _rate_state(r, stack, user["user_id"])
    assert held is not None
    assert client.post("/api/v1/auth/logout", headers=_bearer(access)).status_code == 204
    assert _code(_submit(client, access)) == "token_revoked"
    # Refused inside the limits script before it took anything: no rate step, no row.
    assert _rate_state(r, stack, user["user_id"]) == held
    listed = client.get("/api/v1/query", headers=_bearer(_login(client, user["email"])["access_token"]))
    assert len(listed.json()["items"]) == 1
    r.close()


def test_a_submit_whose_user_state_is_not_cached_gets_the_full_check(
    client: httpx.Client, stack: Stack, db: Any, user: dict[str, Any]
) -> None:
    r = redis.Redis.from_url(stack.settings.redis_url)
    key = f"aiq:auth:user:{user['user_id']}"
    access = user["tokens"]["access_token"]
    r.delete(key)
    assert _submit(client, access).status_code == 202
    assert r.get(key) is not None
    _disable_in_database(db, user["user_id"])
    r.delete(key)
    held = _rate_state(r, stack, user["user_id"])
    assert _code(_submit(client, access)) == "account_disabled"
    assert r.get(key) == b"disabled"
    assert _rate_state(r, stack, user["user_id"]) == held
    r.close()


def test_redis_down_falls_back_to_postgresql_and_lets_no_revoked_credential_in(
    client: httpx.Client, stack: Stack, user: dict[str, Any], tmp_path: Path
) -> None:
    logged_out = _login(client, user["email"])
    assert client.post("/api/v1/auth/logout", headers=_bearer(logged_out["access_token"])).status_code == 204
    key = client.post("/api/v1/keys", json={"name": "k"}, headers=user["headers"]).json()
    revoked_key = client.post("/api/v1/keys", json={"name": "gone"}, headers=user["headers"]).json()
    assert client.delete(f"/api/v1/keys/{revoked_key['id']}", headers=user["headers"]).status_code == 204
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proc, url = spawn_api(stack, tmp_path / "api-no-redis.log", REDIS_URL=dead)
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/api/v1/users/me", headers=user["headers"]).status_code == 200
            assert c.get("/api/v1/query", headers=_bearer(key["key"])).status_code == 200
            assert _code(c.get("/api/v1/users/me", headers=_bearer(logged_out["access_token"]))) == "token_revoked"
            assert _code(c.get("/api/v1/query", headers=_bearer(revoked_key["key"]))) == "invalid_api_key"
            # A submit cannot take its limits without Redis (503), but a revoked token still hears 401.
            assert _code(_submit(c, logged_out["access_token"])) == "token_revoked"
            assert _code(_submit(c, user["tokens"]["access_token"]), 503) == "limits_unavailable"
            # Revoking needs Redis: 503 with Retry-After, never a 2xx that did not take effect everywhere.
            r = c.post("/api/v1/auth/logout", headers=user["headers"])
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "auth_unavailable"
            assert r.headers["retry-after"]
    finally:
        stop(proc)
    assert client.get("/api/v1/users/me", headers=user["headers"]).status_code == 200
