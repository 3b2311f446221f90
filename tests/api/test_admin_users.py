"""Admins: created from the command line, list and search users, disable and enable (revoking at once)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import httpx
import pytest

from tests.support.api import TEST_PASSWORD, register_and_login
from tests.support.stack import Stack


def _admin(client: httpx.Client, stack: Stack) -> dict[str, Any]:
    """A user promoted by `aiq admin create --keep-password`, then logged in again."""
    info = register_and_login(client)
    result = subprocess.run(
        [sys.executable, "-m", "devkit.cli", "admin", "create", info["email"], "--keep-password"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "promoted" in result.stdout
    return info


def test_aiq_admin_create_makes_a_new_admin_from_stdin(client: httpx.Client, stack: Stack) -> None:
    email = f"root-{uuid.uuid4().hex[:8]}@example.com"
    argv = [sys.executable, "-m", "devkit.cli", "admin", "create", email, "--password-stdin"]
    weak = subprocess.run(argv, env=stack.env, input="password\n", capture_output=True, text=True, check=False)
    assert weak.returncode == 2
    assert "common" in weak.stderr
    # A development machine without JWT_SECRET_KEY: the command signs nothing, so it says nothing about the key.
    dev = {k: v for k, v in stack.env.items() if k != "JWT_SECRET_KEY"} | {"ENVIRONMENT": "development"}
    ok = subprocess.run(argv, env=dev, input=f"{TEST_PASSWORD}\n", capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "JWT_SECRET_KEY" not in ok.stderr
    r = client.post("/api/v1/auth/login", json={"email": email, "password": TEST_PASSWORD})
    headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
    assert client.get("/api/v1/users/me", headers=headers).json()["role"] == "admin"
    assert client.get("/api/v1/admin/users", headers=headers).status_code == 200


def test_users_get_403_on_every_admin_route(client: httpx.Client, user: dict[str, Any]) -> None:
    target = user["user_id"]
    for method, path in (
        ("GET", "/api/v1/admin/users"),
        ("POST", f"/api/v1/admin/users/{target}/disable"),
        ("POST", f"/api/v1/admin/users/{target}/enable"),
    ):
        r = client.request(method, path, headers=user["headers"])
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["code"] == "admin_required"
    assert client.get("/api/v1/admin/users").status_code == 401


def test_admin_lists_and_searches_users_paginated(client: httpx.Client, stack: Stack) -> None:
    admin = _admin(client, stack)
    tag = uuid.uuid4().hex[:8]
    for i in range(3):
        email = f"find-{tag}-{i}@example.com"
        assert client.post("/api/v1/auth/register", json={"email": email, "password": TEST_PASSWORD}).status_code == 201
    page = client.get("/api/v1/admin/users", params={"q": tag.upper(), "limit": 2}, headers=admin["headers"]).json()
    assert page["total"] == 3
    assert [u["email"] for u in page["items"]] == [f"find-{tag}-0@example.com", f"find-{tag}-1@example.com"]
    rest = client.get(
        "/api/v1/admin/users", params={"q": tag, "limit": 2, "offset": 2}, headers=admin["headers"]
    ).json()
    assert [u["email"] for u in rest["items"]] == [f"find-{tag}-2@example.com"]
    assert set(rest["items"][0]) >= {"id", "email", "role", "created_at", "disabled_at"}
    # LIKE wildcards are matched literally.
    assert client.get("/api/v1/admin/users", params={"q": "%"}, headers=admin["headers"]).json()["total"] == 0
    admins = client.get("/api/v1/admin/users", params={"role": "admin"}, headers=admin["headers"]).json()
    assert admin["email"] in [u["email"] for u in admins["items"]] or admins["total"] > len(admins["items"])
    assert client.get("/api/v1/admin/users", params={"limit": 0}, headers=admin["headers"]).status_code == 422
    # PostgreSQL text cannot hold U+0000: a 422, not a 500.
    nul = client.get("/api/v1/admin/users", params={"q": "a\x00b"}, headers=admin["headers"])
    assert (nul.status_code, nul.json()["error"]["code"]) == (422, "nul_character")


def test_disabling_revokes_tokens_and_keys_at_once_and_enabling_restores_login(
    client: httpx.Client, stack: Stack, user: dict[str, Any]
) -> None:
    admin = _admin(client, stack)
    key = client.post("/api/v1/keys", json={"name": "bot"}, headers=user["headers"]).json()["key"]
    key_headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/api/v1/query", headers=key_headers).status_code == 200
    assert client.get("/api/v1/users/me", headers=user["headers"]).status_code == 200

    r = client.post(f"/api/v1/admin/users/{user['user_id']}/disable", headers=admin["headers"])
    assert r.status_code == 200, r.text
    assert r.json()["disabled_at"]
    for headers in (user["headers"], key_headers):
        r = client.get("/api/v1/query", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "account_disabled"
    refresh = client.post("/api/v1/auth/refresh", json={"refresh_token": user["tokens"]["refresh_token"]})
    assert refresh.status_code == 401
    login = client.post("/api/v1/auth/login", json={"email": user["email"], "password": TEST_PASSWORD})
    assert login.status_code == 403
    assert login.json()["error"]["code"] == "account_disabled"

    assert client.post(f"/api/v1/admin/users/{user['user_id']}/enable", headers=admin["headers"]).status_code == 200
    login = client.post("/api/v1/auth/login", json={"email": user["email"], "password": TEST_PASSWORD})
    assert login.status_code == 200
    fresh = {"Authorization": f"Bearer {login.json()['access_token']}"}
    me = client.get("/api/v1/users/me", headers=fresh)
    assert me.status_code == 200, me.text
    # Keys survive a suspension; the tokens from before it stay dead.
    assert client.get("/api/v1/query", headers=key_headers).status_code == 200
    assert client.get("/api/v1/users/me", headers=user["headers"]).json()["error"]["code"] == "token_revoked"


def test_admin_cannot_disable_themselves_and_unknown_users_are_404(client: httpx.Client, stack: Stack) -> None:
    admin = _admin(client, stack)
    r = client.post(f"/api/v1/admin/users/{admin['user_id']}/disable", headers=admin["headers"])
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "cannot_disable_self"
    r = client.post(f"/api/v1/admin/users/{uuid.uuid4()}/disable", headers=admin["headers"])
    assert r.status_code == 404


@pytest.mark.parametrize("path", ["/api/v1/admin/users"])
def test_admin_routes_refuse_api_keys(client: httpx.Client, stack: Stack, path: str) -> None:
    admin = _admin(client, stack)
    key = client.post("/api/v1/keys", json={"name": "admin bot"}, headers=admin["headers"]).json()["key"]
    r = client.get(path, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "access_token_required"
