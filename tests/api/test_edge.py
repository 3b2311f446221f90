"""The edge of every request, against the running API: body limit, content type, echo-free errors, headers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from shared.config import Settings
from tests.support.api import TEST_PASSWORD, wait_terminal
from tests.support.db import count_rows
from tests.support.stack import Stack

LIMIT: int = Settings.model_fields["max_body_bytes"].default  # MAX_BODY_BYTES' default, which the stack keeps


def _rows(db: Engine, user: dict[str, Any]) -> int:
    return count_rows(db, "SELECT count(*) FROM queries WHERE user_id = :u", u=user["user_id"])


def test_a_body_over_the_limit_is_413_before_parsing(client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    before = _rows(db, user)
    # Valid JSON that a parser would accept: the refusal is about size alone.
    big = json.dumps({"query": "x" * (LIMIT + 10)}).encode()
    r = client.post("/api/v1/query", content=big, headers={**user["headers"], "content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
    assert r.headers["x-content-type-options"] == "nosniff"
    # Not even JSON: still 413, so nothing parsed it first.
    r = client.post("/api/v1/auth/register", content=b"{" * (LIMIT + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert _rows(db, user) == before


def test_a_chunked_body_over_the_limit_is_413(client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    before = _rows(db, user)

    def chunks() -> Iterator[bytes]:
        yield b'{"query": "'
        for _ in range(LIMIT // 8192 + 2):
            yield b"y" * 8192
        yield b'"}'

    r = client.post("/api/v1/query", content=chunks(), headers={**user["headers"], "content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
    assert _rows(db, user) == before

    def small() -> Iterator[bytes]:
        yield b'{"query": "chunked but '
        yield b'small"}'

    r = client.post("/api/v1/query", content=small(), headers={**user["headers"], "content-type": "application/json"})
    assert r.status_code == 202, r.text


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/xml"])
def test_a_body_that_is_not_json_is_415(
    client: httpx.Client, user: dict[str, Any], db: Engine, content_type: str | None
) -> None:
    before = _rows(db, user)
    headers = dict(user["headers"])
    if content_type:
        headers["content-type"] = content_type
    r = client.post("/api/v1/query", content=b'{"query": "hi"}', headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"
    assert "application/json" in r.json()["error"]["message"]
    assert _rows(db, user) == before
    # JSON with parameters, and +json types, are JSON.
    for ok in ("application/json; charset=utf-8", "application/merge-patch+json"):
        r = client.post("/api/v1/query", content=b'{"query": "hi"}', headers={**user["headers"], "content-type": ok})
        assert r.status_code == 202, (ok, r.text)


def test_login_still_takes_the_oauth2_form(client: httpx.Client, user: dict[str, Any]) -> None:
    r = client.post("/api/v1/auth/login", data={"username": user["email"], "password": TEST_PASSWORD})
    assert r.status_code == 200, r.text


def test_an_empty_and_a_blank_query_give_the_same_code(client: httpx.Client, user: dict[str, Any]) -> None:
    codes = {
        q: client.post("/api/v1/query", json={"query": q}, headers=user["headers"]).json()["error"]["code"]
        for q in ("", " ", "\n\t ")
    }
    assert set(codes.values()) == {"query_blank"}, codes


MARKER = "ZQXmarker9731"


def _no_echo(r: httpx.Response) -> None:
    assert 400 <= r.status_code < 500, r.text
    assert MARKER not in r.text, r.text


def test_errors_never_echo_the_input(client: httpx.Client, user: dict[str, Any]) -> None:
    h = user["headers"]
    r = client.post("/api/v1/query", json={"query": "hi", "model": f"gpt-{MARKER}"}, headers=h)
    assert r.json()["error"]["code"] == "model_not_allowed"
    _no_echo(r)
    for path in (f"/api/v1/query/{MARKER}", f"/api/v1/query/x{MARKER}/cancel"):
        r = client.request("POST" if path.endswith("cancel") else "GET", path, headers=h)
        assert r.status_code == 422
        _no_echo(r)
    _no_echo(client.get("/api/v1/query", params={"status": MARKER}, headers=h))
    _no_echo(client.get("/api/v1/query", params={"limit": MARKER}, headers=h))
    _no_echo(client.get("/api/v1/query/" + str(uuid.uuid4()), params={"wait": MARKER}, headers=h))
    _no_echo(client.post("/api/v1/query", json={"query": "hi", "temperature": MARKER}, headers=h))
    _no_echo(client.post("/api/v1/query", json={"query": {"nested": MARKER}}, headers=h))
    _no_echo(client.post("/api/v1/auth/register", json={"email": f"{MARKER}@@x", "password": "p" * 12}))
    _no_echo(client.post("/api/v1/auth/register", json={"email": f"a@{MARKER}..com", "password": "p" * 12}))
    _no_echo(client.post("/api/v1/auth/refresh", json={"refresh_token": [MARKER]}))
    # `loc` names the field, an unknown one too (that is the point of the error), bounded in length.
    r = client.post("/api/v1/query", json={"query": "hi", "k" * 5000: 1}, headers=h)
    assert r.status_code == 422
    assert len(r.text) < 1000


def _nested(depth: int) -> bytes:
    return b'{"query": "hi", "metadata": {"k": ' + b"[" * depth + b"]" * depth + b"}}"


@pytest.mark.parametrize("depth", [1_000, 10_000, 100_000])
def test_deeply_nested_json_is_a_4xx_on_every_json_route(
    client: httpx.Client, user: dict[str, Any], depth: int
) -> None:
    h = {**user["headers"], "content-type": "application/json"}
    deep_array = b"[" * depth + b"]" * depth
    targets = [
        ("/api/v1/query", _nested(depth)),
        ("/api/v1/query", deep_array),
        ("/api/v1/auth/register", b'{"email": ' + deep_array + b', "password": "longenough"}'),
        ("/api/v1/auth/refresh", b'{"refresh_token": ' + deep_array + b"}"),
        ("/api/v1/auth/logout", b'{"refresh_token": ' + deep_array + b"}"),
    ]
    for path, body in targets:
        r = client.post(path, content=body, headers=h)
        assert 400 <= r.status_code < 500, (path, depth, r.status_code, r.text[:200])
        assert r.json()["error"]["code"]


# `"\ud800"` is valid JSON syntax but no Unicode text: PostgreSQL and UTF-8 encoders cannot take it.
_LONE_SURROGATE = "\\ud800"


@pytest.mark.parametrize(
    "body",
    [
        '{"query": "a%sb"}',
        '{"query": "hi", "system": "%s"}',
        '{"query": "hi", "metadata": {"k": "%s"}}',
        '{"query": "hi", "metadata": {"%s": 1}}',
        '{"query": "hi", "metadata": {"k": ["x", {"deeper": "%s"}]}}',
    ],
)
@pytest.mark.parametrize("idempotent", [False, True])
def test_a_lone_surrogate_in_a_submit_is_422_and_stores_nothing(
    client: httpx.Client, user: dict[str, Any], db: Engine, body: str, idempotent: bool
) -> None:
    h = {**user["headers"], "content-type": "application/json"}
    if idempotent:
        h["Idempotency-Key"] = str(uuid.uuid4())
    before = _rows(db, user)
    r = client.post("/api/v1/query", content=(body % _LONE_SURROGATE).encode(), headers=h)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"][0]["type"] == "invalid_unicode"
    assert _rows(db, user) == before


@pytest.mark.parametrize("email", ['"%s@example.com"', '"%s"'])
def test_a_lone_surrogate_in_a_login_is_4xx(client: httpx.Client, email: str) -> None:
    body = '{"email": %s, "password": "correct horse battery staple"}' % (email % _LONE_SURROGATE)
    r = client.post("/api/v1/auth/login", content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


def test_a_failed_querys_usage_is_null(client: httpx.Client, user: dict[str, Any]) -> None:
    r = client.post("/api/v1/query", json={"query": f"[[sim fail=400]] {uuid.uuid4()}"}, headers=user["headers"])
    done = wait_terminal(client, user["headers"], r.json()["query_id"])
    assert done["status"] == "failed"
    assert done["usage"] is None
    ok = client.post("/api/v1/query", json={"query": f"fine {uuid.uuid4()}"}, headers=user["headers"])
    done = wait_terminal(client, user["headers"], ok.json()["query_id"])
    assert done["status"] == "completed"
    assert done["usage"]["total_tokens"] > 0


def test_json_answers_carry_nosniff(client: httpx.Client, user: dict[str, Any]) -> None:
    for r in (
        client.get("/healthz"),
        client.get("/api/v1/query", headers=user["headers"]),
        client.get("/api/v1/query"),  # 401
        client.get("/nope"),  # 404
        client.get("/openapi.json"),
    ):
        assert r.headers["x-content-type-options"] == "nosniff", r.request.url
        assert "content-security-policy" not in r.headers


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_html_carries_csp_and_frame_protection(client: httpx.Client, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    csp = {d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split("; ")}
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["script-src"] == ["'self'"]
    assert csp["default-src"] == ["'none'"]
    # Nothing from another host: every asset is the package's own.
    assert "http" not in r.text.replace('lang="en"', "")
    for asset in ("/static/docs/swagger-ui/swagger-ui-bundle.js", "/static/docs/redoc/redoc.standalone.js"):
        if asset.rsplit("/", 1)[-1] in r.text:
            assert client.get(asset).status_code == 200


def test_metrics_are_not_on_the_public_port(client: httpx.Client, stack: Stack) -> None:
    assert client.get("/metrics").status_code == 404
    r = httpx.get(f"http://127.0.0.1:{stack.env['API_METRICS_PORT']}/metrics")
    assert r.status_code == 200
    assert "aiq_http_requests_total" in r.text
