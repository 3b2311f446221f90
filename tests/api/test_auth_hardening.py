"""Login and registration as an attacker would try them: deep JSON, caching, OAuth2 error shapes, policy."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import httpx
import pytest

from shared.config import Settings
from shared.errors import InvalidInput
from shared.password_policy import check_password, common_passwords
from shared.services import auth as auth_service
from tests.support.api import TEST_PASSWORD, register_and_login
from tests.support.db import count_rows

DEEP = 1_000


def _nested(depth: int) -> bytes:
    return b'{"email": ' + b"[" * depth + b"]" * depth + b', "password": "x"}'


@pytest.mark.parametrize("path", ["/api/v1/auth/login", "/api/v1/auth/register", "/api/v1/auth/refresh"])
def test_json_nested_a_thousand_deep_is_a_4xx(client: httpx.Client, path: str) -> None:
    for body in (_nested(DEEP), b"[" * DEEP * 10 + b"]" * DEEP * 10):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:200])
        assert r.json()["error"]["code"]


def test_token_responses_are_not_cacheable(client: httpx.Client, user: dict[str, Any]) -> None:
    login = client.post("/api/v1/auth/login", json={"email": user["email"], "password": TEST_PASSWORD})
    form = client.post("/api/v1/auth/login", data={"username": user["email"], "password": TEST_PASSWORD})
    refresh = client.post("/api/v1/auth/refresh", json={"refresh_token": login.json()["refresh_token"]})
    for r in (login, form, refresh):
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["pragma"] == "no-cache"


def test_oauth2_form_failures_use_the_oauth2_error_format(client: httpx.Client, user: dict[str, Any]) -> None:
    wrong = client.post("/api/v1/auth/login", data={"username": user["email"], "password": "not the password"})
    assert wrong.status_code == 400
    assert wrong.json() == {"error": "invalid_grant", "error_description": "Incorrect email or password"}
    assert wrong.headers["cache-control"] == "no-store"
    missing = client.post("/api/v1/auth/login", data={"username": user["email"]})
    assert missing.status_code == 400
    assert missing.json()["error"] == "invalid_request"
    assert missing.json()["error_description"]
    # The JSON login keeps AIQ's own error body for the same mistake.
    as_json = client.post("/api/v1/auth/login", json={"email": user["email"], "password": "not the password"})
    assert as_json.status_code == 401
    assert as_json.json() == {"error": {"code": "invalid_credentials", "message": "Incorrect email or password"}}


def test_logout_204_has_no_body_and_no_content_type(client: httpx.Client, user: dict[str, Any]) -> None:
    r = client.post(
        "/api/v1/auth/logout", json={"refresh_token": user["tokens"]["refresh_token"]}, headers=user["headers"]
    )
    assert r.status_code == 204
    assert r.content == b""
    assert "content-type" not in r.headers


@pytest.mark.parametrize(
    ("password", "code"),
    [
        ("shrt", "password_too_short"),
        ("1234567", "password_too_short"),
        ("12345678", "password_too_common"),
        ("Password1", "password_too_common"),
        ("qwertyuiop", "password_too_common"),
        ("é" * 40, "password_too_long"),
    ],
)
def test_register_refuses_weak_passwords_with_a_clear_code(
    client: httpx.Client, db: Any, password: str, code: str
) -> None:
    email = f"weak-{uuid.uuid4().hex[:8]}@example.com"
    r = client.post("/api/v1/auth/register", json={"email": email, "password": password})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert error["details"][0]["loc"] == ["body", "password"]
    assert f'"{password}"' not in r.text
    assert count_rows(db, "SELECT count(*) FROM users WHERE email = :e", e=email) == 0


def test_register_refuses_the_email_as_password(client: httpx.Client) -> None:
    local = f"mailpass{uuid.uuid4().hex[:8]}"
    for password in (f"{local}@example.com", local):
        r = client.post("/api/v1/auth/register", json={"email": f"{local}@example.com", "password": password})
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "password_matches_email"


def test_no_composition_rules_and_long_passphrases_work(client: httpx.Client) -> None:
    # All lower case, no digits, no symbols: fine. 72 bytes is bcrypt's whole input.
    for password in ("plain lower case words only", "p" * 72, "ünïcödé pässphräse"):
        assert register_and_login(client, password=password)["tokens"]["access_token"]


def test_blocklist_is_loaded_once_and_large() -> None:
    assert common_passwords() is common_passwords()
    assert len(common_passwords()) > 19_000
    assert "password" in common_passwords()


def test_min_length_follows_the_setting() -> None:
    check_password("twelve chars", "a@example.com", 12)
    with pytest.raises(InvalidInput) as exc:
        check_password("eleven char", "a@example.com", 12)
    assert exc.value.code == "password_too_short"
    with pytest.raises(ValueError, match="password_min_length"):
        Settings(password_min_length=7)


def test_unknown_user_dummy_hash_is_never_built_on_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    callers: list[int] = []
    real = auth_service.hash_password

    def recording(password: str, rounds: int) -> str:
        callers.append(threading.get_ident())
        return real(password, rounds)

    monkeypatch.setattr(auth_service, "hash_password", recording)
    monkeypatch.setattr(auth_service, "_dummy_hashes", {})

    async def run() -> int:
        loop_thread = threading.get_ident()
        assert not await asyncio.to_thread(auth_service._check_unknown_user, "guess", 4)
        return loop_thread

    loop_thread = asyncio.run(run())
    assert callers
    assert loop_thread not in callers
