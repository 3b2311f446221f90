"""API keys: shown once, stored hashed, usable as a bearer token, scoped, revocable at once."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from tests.support.api import register_and_login
from tests.support.stack import Stack, spawn_api, stop


def _key(client: httpx.Client, user: dict[str, Any], **body: Any) -> dict[str, Any]:
    r = client.post("/api/v1/keys", json={"name": "ci", **body}, headers=user["headers"])
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_key_is_shown_once_and_stored_as_a_hash(client: httpx.Client, db: Any, user: dict[str, Any]) -> None:
    created = _key(client, user)
    secret = created["key"]
    assert secret.startswith("aiq_")
    assert len(secret) >= 40
    assert secret.startswith(created["prefix"])
    assert created["scopes"] == ["queries:read", "queries:write"]
    listed = client.get("/api/v1/keys", headers=user["headers"]).json()
    assert [k["id"] for k in listed] == [created["id"]]
    assert "key" not in listed[0]
    assert set(listed[0]) == {"id", "name", "prefix", "scopes", "created_at", "last_used_at"}
    with db.connect() as conn:
        stored = conn.execute(text("SELECT secret_hash FROM api_keys WHERE id = :id"), {"id": created["id"]}).scalar()
    assert stored == hashlib.sha256(secret.encode()).hexdigest()


def test_key_works_wherever_an_access_token_does(client: httpx.Client, user: dict[str, Any]) -> None:
    key = _key(client, user)["key"]
    assert client.get("/api/v1/users/me", headers=_bearer(key)).json()["id"] == user["user_id"]
    r = client.post("/api/v1/query", json={"query": "hello from a key"}, headers=_bearer(key))
    assert r.status_code == 202, r.text
    query_id = r.json()["query_id"]
    # Same owner: the query is visible with the user's token, and listed for them.
    assert client.get(f"/api/v1/query/{query_id}", headers=user["headers"]).status_code == 200
    assert client.get(f"/api/v1/query/{query_id}", headers=_bearer(key)).status_code == 200


def test_scopes_read_only_key_gets_403_on_submit_and_cancel(client: httpx.Client, user: dict[str, Any]) -> None:
    read_only = _key(client, user, scopes=["queries:read"])["key"]
    write_only = _key(client, user, scopes=["queries:write"])["key"]
    submitted = client.post("/api/v1/query", json={"query": "by the owner"}, headers=user["headers"]).json()
    r = client.post("/api/v1/query", json={"query": "x"}, headers=_bearer(read_only))
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "insufficient_scope"
    r = client.post(f"/api/v1/query/{submitted['query_id']}/cancel", headers=_bearer(read_only))
    assert r.status_code == 403
    assert client.get(f"/api/v1/query/{submitted['query_id']}", headers=_bearer(read_only)).status_code == 200
    assert client.get("/api/v1/query", headers=_bearer(write_only)).status_code == 403
    assert client.post("/api/v1/query", json={"query": "y"}, headers=_bearer(write_only)).status_code == 202


def test_the_scope_is_checked_before_the_parameters(client: httpx.Client, user: dict[str, Any]) -> None:
    """A key lacking the scope hears 403 whatever its parameters, on the routes that read the principal too."""
    write_only = _key(client, user, scopes=["queries:write"])["key"]
    for path in ("/api/v1/usage?from=not-a-date", "/api/v1/query/not-a-uuid", "/api/v1/query?limit=0"):
        r = client.get(path, headers=_bearer(write_only))
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["code"] == "insufficient_scope"
    read_only = _key(client, user, scopes=["queries:read"])["key"]
    assert client.get("/api/v1/usage", headers=_bearer(read_only)).status_code == 200
    assert client.get("/api/v1/usage?from=not-a-date", headers=_bearer(read_only)).status_code == 422


def test_keys_cannot_manage_keys_log_out_change_the_password_or_delete_the_account(
    client: httpx.Client, user: dict[str, Any]
) -> None:
    key = _key(client, user)["key"]
    for method, path in (
        ("POST", "/api/v1/keys"),
        ("GET", "/api/v1/keys"),
        ("POST", "/api/v1/auth/logout"),
        ("POST", "/api/v1/auth/logout-all"),
        ("POST", "/api/v1/auth/password"),
        ("DELETE", "/api/v1/users/me"),
    ):
        r = client.request(method, path, headers=_bearer(key), json={"name": "x"} if path.endswith("keys") else None)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["code"] == "access_token_required"
    assert client.get("/api/v1/users/me", headers=user["headers"]).status_code == 200


def test_revoked_key_stops_at_once_and_others_keys_are_404(client: httpx.Client, user: dict[str, Any]) -> None:
    created = _key(client, user)
    key = created["key"]
    assert client.get("/api/v1/query", headers=_bearer(key)).status_code == 200
    other = register_and_login(client)
    assert client.delete(f"/api/v1/keys/{created['id']}", headers=other["headers"]).status_code == 404
    assert client.get("/api/v1/query", headers=_bearer(key)).status_code == 200
    assert client.delete(f"/api/v1/keys/{created['id']}", headers=user["headers"]).status_code == 204
    r = client.get("/api/v1/query", headers=_bearer(key))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/api/v1/keys", headers=user["headers"]).json() == []
    assert client.delete(f"/api/v1/keys/{created['id']}", headers=user["headers"]).status_code == 404


def test_revocation_reaches_another_api_process_that_cached_the_key(
    client: httpx.Client, stack: Stack, user: dict[str, Any], tmp_path: Path
) -> None:
    created = _key(client, user)
    proc, url = spawn_api(stack, tmp_path / "api-2.log")
    try:
        with httpx.Client(base_url=url, timeout=10) as second:
            assert second.get("/api/v1/query", headers=_bearer(created["key"])).status_code == 200
            assert client.delete(f"/api/v1/keys/{created['id']}", headers=user["headers"]).status_code == 204
            assert second.get("/api/v1/query", headers=_bearer(created["key"])).status_code == 401
    finally:
        stop(proc)


def test_unknown_and_malformed_keys_are_401(client: httpx.Client) -> None:
    for key in ("aiq_" + "A" * 43, "aiq_", "aiq_\u00e9"):
        r = client.get("/api/v1/query", headers={"Authorization": f"Bearer {key}".encode()})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_last_used_is_recorded_without_a_write_per_request(
    client: httpx.Client, stack: Stack, db: Any, user: dict[str, Any], tmp_path: Path
) -> None:
    created = _key(client, user)
    assert created["last_used_at"] is None

    def last_used() -> Any:
        with db.connect() as conn:
            return conn.execute(
                text("SELECT last_used_at FROM api_keys WHERE id = :id"), {"id": created["id"]}
            ).scalar()

    # A fresh API process writes its first batch at once, then at most once a minute.
    proc, url = spawn_api(stack, tmp_path / "api-3.log")
    try:
        with httpx.Client(base_url=url, timeout=10) as fresh:
            assert fresh.get("/api/v1/query", headers=_bearer(created["key"])).status_code == 200
            deadline = time.monotonic() + 10
            while last_used() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            first = last_used()
            assert first is not None
            for _ in range(20):
                assert fresh.get("/api/v1/query", headers=_bearer(created["key"])).status_code == 200
            time.sleep(0.5)
            assert last_used() == first
    finally:
        stop(proc)
    listed = client.get("/api/v1/keys", headers=user["headers"]).json()
    assert listed[0]["last_used_at"] is not None


def test_name_and_scopes_are_validated(client: httpx.Client, user: dict[str, Any]) -> None:
    for body in ({"name": ""}, {"name": "x", "scopes": ["admin"]}, {"name": "x", "scopes": []}, {}, {"name": "a\x00b"}):
        r = client.post("/api/v1/keys", json=body, headers=user["headers"])
        assert r.status_code == 422, body
    assert client.get("/api/v1/keys", headers=user["headers"]).json() == []
