"""Submitting, reading and listing queries through the real API."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import Engine

from devkit.procs import free_port
from tests.support.api import register_and_login
from tests.support.db import count_rows
from tests.support.stack import Stack, api_metrics, spawn_api, stop


def _submit(client: httpx.Client, headers: dict[str, str], **body: Any) -> httpx.Response:
    return client.post("/api/v1/query", json={"query": "What is AIQ?", **body}, headers=headers)


def test_submit_returns_202_with_location(client: httpx.Client, user: dict[str, Any]) -> None:
    r = _submit(client, user["headers"], metadata={"ticket": 7})
    assert r.status_code == 202
    body = r.json()
    assert body["status"] == "pending"
    assert body["model"] == "sim-small"
    assert r.headers["location"] == f"/api/v1/query/{body['query_id']}"
    got = client.get(r.headers["location"], headers=user["headers"]).json()
    assert got["query"] == "What is AIQ?"
    assert got["metadata"] == {"ticket": 7}
    assert got["usage"] is None  # nothing reported yet: null, not an object of nulls


def test_priority_is_interactive_by_default_batch_on_request_and_nothing_else(
    client: httpx.Client, user: dict[str, Any], db: Engine
) -> None:
    default = _submit(client, user["headers"]).json()
    assert (
        client.get(f"/api/v1/query/{default['query_id']}", headers=user["headers"]).json()["priority"] == "interactive"
    )
    batch = _submit(client, user["headers"], priority="batch").json()
    assert client.get(f"/api/v1/query/{batch['query_id']}", headers=user["headers"]).json()["priority"] == "batch"
    before = count_rows(db, "SELECT count(*) FROM queries")
    bad = _submit(client, user["headers"], priority="urgent")
    assert bad.status_code == 422
    assert bad.json()["error"]["details"][0]["loc"] == ["body", "priority"]
    assert count_rows(db, "SELECT count(*) FROM queries") == before


def test_submit_requires_a_token(client: httpx.Client) -> None:
    r = client.post("/api/v1/query", json={"query": "hi"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"


def test_invalid_submissions_are_422_and_store_nothing(client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    cases: dict[str, tuple[Any, str]] = {
        "empty": ({"query": ""}, "query_blank"),
        "blank": ({"query": "   \n"}, "query_blank"),
        "too long": ({"query": "x" * 2001}, "query_too_long"),
        "system too long": ({"query": "hi", "system": "s" * 2001}, "system_too_long"),
        "model not allowed": ({"query": "hi", "model": "gpt-5-ultra"}, "model_not_allowed"),
        "temperature high": ({"query": "hi", "temperature": 2.5}, "validation_error"),
        "temperature negative": ({"query": "hi", "temperature": -0.1}, "validation_error"),
        "max_tokens zero": ({"query": "hi", "max_tokens": 0}, "validation_error"),
        "max_tokens huge": ({"query": "hi", "max_tokens": 10**6}, "max_tokens_too_large"),
        "unknown field": ({"query": "hi", "priority": "high"}, "validation_error"),
        "wrong type": ({"query": 42}, "validation_error"),
        "missing query": ({"model": "sim-small"}, "validation_error"),
        "metadata not object": ({"query": "hi", "metadata": [1, 2]}, "validation_error"),
        "metadata too big": ({"query": "hi", "metadata": {"k": "v" * 5000}}, "metadata_too_large"),
        "not an object": ([1, 2, 3], "validation_error"),
        # PostgreSQL cannot store U+0000 in text or jsonb: a 422, not the INSERT's 500.
        "NUL in query": ({"query": "hi\x00there"}, "nul_character"),
        "NUL in system": ({"query": "hi", "system": "be\x00nice"}, "nul_character"),
        "NUL in metadata value": ({"query": "hi", "metadata": {"k": ["ok", {"deep": "a\x00b"}]}}, "nul_character"),
        "NUL in metadata key": ({"query": "hi", "metadata": {"k\x00": 1}}, "nul_character"),
    }
    before = count_rows(db, "SELECT count(*) FROM queries WHERE user_id = :u", u=user["user_id"])
    for name, (body, code) in cases.items():
        r = client.post("/api/v1/query", json=body, headers=user["headers"])
        assert r.status_code == 422, (name, r.text)
        error = r.json()["error"]
        assert error["code"] == code, (name, error)
        assert error["message"]
    for raw in (b"{not json", b"", b'{"query": "hi",}'):
        r = client.post("/api/v1/query", content=raw, headers={**user["headers"], "content-type": "application/json"})
        assert r.status_code == 422, raw
        assert r.json()["error"]["code"] in {"malformed_json", "validation_error"}
    # The Idempotency-Key path stores through the ORM session: the same checks hold there.
    r = client.post(
        "/api/v1/query", json={"query": "a\x00b"}, headers={**user["headers"], "Idempotency-Key": "nul-check"}
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "nul_character"
    assert count_rows(db, "SELECT count(*) FROM queries WHERE user_id = :u", u=user["user_id"]) == before


def test_a_boolean_sent_as_a_string_or_a_number_is_422_and_stores_nothing(
    client: httpx.Client, user: dict[str, Any], db: Engine
) -> None:
    before = count_rows(db, "SELECT count(*) FROM queries WHERE user_id = :u", u=user["user_id"])
    for value in ("yes", "true", "false", "1", 1, 0):
        r = client.post("/api/v1/query", json={"query": "hi", "cache": value}, headers=user["headers"])
        assert r.status_code == 422, (value, r.text)
        error = r.json()["error"]
        assert error["code"] == "validation_error"
        assert error["details"][0]["loc"] == ["body", "cache"]
        assert "boolean" in error["details"][0]["msg"]
    assert count_rows(db, "SELECT count(*) FROM queries WHERE user_id = :u", u=user["user_id"]) == before
    accepted = client.post("/api/v1/query", json={"query": "hi", "cache": False}, headers=user["headers"])
    assert accepted.status_code == 202, accepted.text


def test_a_number_sent_as_a_string_or_a_boolean_is_422_and_stores_nothing(
    client: httpx.Client, user: dict[str, Any], db: Engine
) -> None:
    before = count_rows(db, "SELECT count(*) FROM queries WHERE user_id = :u", u=user["user_id"])
    cases = [
        ("temperature", False),
        ("temperature", "0.5"),
        ("max_tokens", True),
        ("max_tokens", "10"),
        ("max_tokens", 10.5),
    ]
    for field, value in cases:
        r = client.post("/api/v1/query", json={"query": "hi", field: value}, headers=user["headers"])
        assert r.status_code == 422, (field, value, r.text)
        error = r.json()["error"]
        assert error["code"] == "validation_error"
        assert error["details"][0]["loc"] == ["body", field]
        assert "valid" in error["details"][0]["msg"]
    assert count_rows(db, "SELECT count(*) FROM queries WHERE user_id = :u", u=user["user_id"]) == before
    # JSON numbers: an integer is a number too.
    accepted = client.post(
        "/api/v1/query", json={"query": "hi", "temperature": 1, "max_tokens": 10}, headers=user["headers"]
    )
    assert accepted.status_code == 202, accepted.text


def test_validation_errors_do_not_echo_the_input(client: httpx.Client, user: dict[str, Any]) -> None:
    secret = f"top-secret-{uuid.uuid4().hex}"
    r = client.post("/api/v1/query", json={"query": secret, "temperature": "hot"}, headers=user["headers"])
    assert r.status_code == 422
    assert secret not in r.text


def test_max_query_chars_boundary_is_accepted(client: httpx.Client, user: dict[str, Any]) -> None:
    assert _submit(client, user["headers"], query="y" * 2000).status_code == 202


def test_another_users_query_is_indistinguishable_from_a_missing_one(
    client: httpx.Client, user: dict[str, Any]
) -> None:
    query_id = _submit(client, user["headers"]).json()["query_id"]
    intruder = register_and_login(client)
    theirs = client.get(f"/api/v1/query/{query_id}", headers=intruder["headers"])
    missing = client.get(f"/api/v1/query/{uuid.uuid4()}", headers=intruder["headers"])
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json() == missing.json()
    assert client.get("/api/v1/query", headers=intruder["headers"]).json()["items"] == []


def test_malformed_query_id_is_422(client: httpx.Client, user: dict[str, Any]) -> None:
    r = client.get("/api/v1/query/not-a-uuid", headers=user["headers"])
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "validation_error"


def test_list_is_newest_first_with_cursor_pagination(client: httpx.Client, user: dict[str, Any]) -> None:
    ids = [_submit(client, user["headers"], query=f"q{i}").json()["query_id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/api/v1/query", params=params, headers=user["headers"]).json()
        seen += [item["query_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))


def test_list_filters_by_status_and_validates_parameters(client: httpx.Client, user: dict[str, Any]) -> None:
    _submit(client, user["headers"])
    failed = client.get("/api/v1/query", params={"status": "failed"}, headers=user["headers"]).json()
    assert all(item["status"] == "failed" for item in failed["items"])
    for params in ({"status": "exploded"}, {"limit": 0}, {"limit": 101}, {"cursor": "garbage!!"}):
        r = client.get("/api/v1/query", params=params, headers=user["headers"])
        assert r.status_code == 422, params
        assert r.json()["error"]["code"] in {"validation_error", "invalid_cursor"}


def test_unknown_route_and_method_are_json(client: httpx.Client, user: dict[str, Any]) -> None:
    r = client.get("/api/v1/nope", headers=user["headers"])
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    r = client.delete("/api/v1/query", headers=user["headers"])
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"
    # `Allow` names every method of the path, though each is a route of its own (RFC 9110).
    assert set(r.headers["allow"].split(", ")) == {"GET", "POST"}
    r = client.options("/v1/files", headers=user["headers"])
    assert (r.status_code, r.json()["error"]["code"]) == (405, "method_not_allowed")
    assert set(r.headers["allow"].split(", ")) == {"GET", "POST"}


def test_operations_endpoints(client: httpx.Client, stack: Stack) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}
    assert client.get("/openapi.json").json()["paths"]["/api/v1/query"]
    assert client.get("/docs").status_code == 200
    assert "aiq_" in api_metrics(stack)
    # The public port does not answer it (served on API_METRICS_PORT only).
    assert client.get("/metrics").status_code == 404


def test_database_down_is_503_with_retry_after_not_500(stack: Stack, user: dict[str, Any], tmp_path: Path) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/aiq"
    api, url = spawn_api(stack, tmp_path / "api-dead-db.log", DATABASE_URL=dead)
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            ready = c.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"] == {"database": "down", "broker": "ok"}
            for r in (
                c.post("/api/v1/query", json={"query": "hi"}, headers=user["headers"]),
                c.get(f"/api/v1/query/{uuid.uuid4()}", headers=user["headers"]),
                c.get("/api/v1/query", headers=user["headers"]),
                c.post("/api/v1/auth/login", json={"email": user["email"], "password": "whatever-123"}),
            ):
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "database_unavailable"
                assert r.headers["retry-after"]
    finally:
        stop(api)
