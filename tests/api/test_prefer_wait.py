"""`Prefer: wait=N` on the native submit: one request for a query that ends within N seconds, through the real
stack (API, PostgreSQL, Redis, a Celery worker, the simulator over HTTP)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from api.routes.queries import wait_preference


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("wait=10", 10.0),
        ("WAIT = 2.5", 2.5),
        ('wait="4"', 4.0),
        ("handling=lenient, wait=3", 3.0),
        ("wait=5; foo=bar", 5.0),
        ("wait=600", 30.0),
        ("wait=0", None),
        ("wait=-1", None),
        ("wait=soon", None),
        ("wait=nan", None),
        ("wait=inf", None),
        ("wait", None),
        ("respond-async, wait=10", None),
        ("return=minimal", None),
    ],
)
def test_the_wait_preference_is_read_as_rfc_7240_says(header: str | None, expected: float | None) -> None:
    assert wait_preference(header) == expected


def _submit(client: httpx.Client, user: dict[str, Any], prompt: str, **headers: str) -> httpx.Response:
    return client.post("/api/v1/query", json={"query": prompt}, headers={**user["headers"], **headers}, timeout=40)


def test_a_query_that_ends_within_the_wait_is_answered_by_the_submit(
    client: httpx.Client, user: dict[str, Any]
) -> None:
    started = time.monotonic()
    r = _submit(client, user, f"[[sim latency_ms=400]] one request {uuid.uuid4()}", Prefer="wait=20")
    elapsed = time.monotonic() - started
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "completed"
    assert body["response"]
    assert body["usage"]["total_tokens"] > 0
    assert r.headers["Preference-Applied"] == "wait=20"
    assert r.headers["Location"] == f"/api/v1/query/{body['query_id']}"
    assert r.headers["RateLimit"]
    # Answered once the upstream had (0.4 s), not at the end of the wait.
    assert 0.4 <= elapsed < 10, elapsed
    # The same query as a read gives.
    again = client.get(body_location(r), headers=user["headers"])
    assert again.json() == body


def body_location(r: httpx.Response) -> str:
    return str(r.headers["Location"])


def test_a_query_still_running_at_the_end_of_the_wait_gets_the_usual_202(
    client: httpx.Client, user: dict[str, Any]
) -> None:
    started = time.monotonic()
    r = _submit(client, user, f"[[sim latency_ms=2200]] slow {uuid.uuid4()}", Prefer="wait=1")
    elapsed = time.monotonic() - started
    assert r.status_code == 202, r.text
    assert set(r.json()) >= {"query_id", "status"}
    # The status the wait last saw: a worker claimed it well within the second (the upstream takes 2.2 s).
    assert r.json()["status"] == "running"
    assert r.headers["Preference-Applied"] == "wait=1"
    assert 1.0 <= elapsed < 2.2, elapsed
    # It goes on as any query: the long-poll finds its end.
    done = client.get(body_location(r), params={"wait": 20}, headers=user["headers"], timeout=30).json()
    assert done["status"] == "completed"


def test_without_a_usable_wait_preference_the_submit_answers_at_once(
    client: httpx.Client, user: dict[str, Any]
) -> None:
    for prefer in (None, "respond-async, wait=10", "wait=soon", "return=minimal"):
        started = time.monotonic()
        extra = {} if prefer is None else {"Prefer": prefer}
        r = _submit(client, user, f"[[sim latency_ms=1500]] async {uuid.uuid4()}", **extra)
        assert r.status_code == 202, (prefer, r.text)
        assert "Preference-Applied" not in r.headers
        assert time.monotonic() - started < 1.2, prefer


def test_a_failed_query_is_answered_too(client: httpx.Client, user: dict[str, Any]) -> None:
    r = _submit(client, user, f"[[sim fail=401]] refused {uuid.uuid4()}", Prefer="wait=20")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "failed"
    assert r.json()["error"]["code"] == "upstream_auth_failed"


def test_an_idempotent_retry_that_waits_gets_the_finished_query(
    client: httpx.Client, user: dict[str, Any], db: Engine
) -> None:
    key = uuid.uuid4().hex
    prompt = f"[[sim latency_ms=300]] keyed {uuid.uuid4()}"
    first = _submit(client, user, prompt, Prefer="wait=20", **{"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    query_id = first.json()["query_id"]
    retry = _submit(client, user, prompt, Prefer="wait=20", **{"Idempotency-Key": key})
    assert retry.status_code == 200, retry.text
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json() == first.json()
    with db.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM queries WHERE user_id = :u"), {"u": user["user_id"]})
        assert stored.scalar_one() >= 1
        calls = conn.execute(text("SELECT attempts FROM queries WHERE id = :q"), {"q": query_id}).scalar_one()
    # One query, one attempt: the retry waited on the same row.
    assert calls == 1


def test_invalid_input_with_a_wait_is_still_a_clean_4xx(client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    with db.connect() as conn:
        before = conn.execute(text("SELECT count(*) FROM queries WHERE user_id = :u"), {"u": user["user_id"]})
        count = before.scalar_one()
    r = client.post("/api/v1/query", json={"query": "   "}, headers={**user["headers"], "Prefer": "wait=5"}, timeout=10)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "query_blank"
    with db.connect() as conn:
        after = conn.execute(text("SELECT count(*) FROM queries WHERE user_id = :u"), {"u": user["user_id"]})
        assert after.scalar_one() == count
