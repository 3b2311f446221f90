"""Cancel and Idempotency-Key on the real API, with the real worker behind it."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from shared.repositories import queries_asyncpg as queries_repo
from shared.repositories.queries_asyncpg import Claim
from tests.support.api import register_and_login, wait_terminal
from tests.support.db import count_rows, insert_query, row
from tests.support.polling import wait_until
from tests.support.stack import Stack


def _insert_pending(db: Engine, user_id: str) -> str:
    """A pending row whose message was never sent and that is not due for an hour: it stays pending."""
    return insert_query(db, user_id, next_attempt_at="now() + interval '1 hour'")


def test_cancel_pending_is_immediate_and_final(client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    query_id = _insert_pending(db, user["user_id"])
    r = client.post(f"/api/v1/query/{query_id}/cancel", headers=user["headers"])
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "cancelled"
    assert body["error"]["code"] == "cancelled"
    assert body["finished_at"]
    again = client.post(f"/api/v1/query/{query_id}/cancel", headers=user["headers"])
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "query_not_cancellable"


def test_cancel_running_stops_the_call_and_a_late_answer_never_lands(
    client: httpx.Client, stack: Stack, user: dict[str, Any], db: Engine
) -> None:
    r = client.post(
        "/api/v1/query", json={"query": f"[[sim latency_ms=2500]] slow {uuid.uuid4()}"}, headers=user["headers"]
    )
    query_id = r.json()["query_id"]
    wait_until(lambda: row(db, query_id)["status"] == "running")
    cancel = client.post(f"/api/v1/query/{query_id}/cancel", headers=user["headers"])
    assert cancel.status_code == 202
    assert cancel.json()["cancel_requested"] is True
    body = wait_terminal(client, user["headers"], query_id)
    assert body["status"] == "cancelled"
    assert body["response"] is None
    stored = row(db, query_id)
    # The heartbeat (0.5 s here) stopped the call well before the upstream's 2.5 s answer.
    elapsed = (stored["finished_at"] - stored["cancel_requested_at"]).total_seconds()
    assert elapsed < 1.5, elapsed
    assert client.post(f"/api/v1/query/{query_id}/cancel", headers=user["headers"]).status_code == 409


@pytest.mark.parametrize("outcome", ["fail", "retry", "complete"])
def test_a_cancel_accepted_while_running_wins_over_every_outcome(
    stack: Stack, user: dict[str, Any], db: Engine, outcome: str
) -> None:
    # The worker's last write lands after the client was told 202 "cancelling": the row must end cancelled.
    query_id = insert_query(
        db,
        user["user_id"],
        status="'running'",
        attempts="1",
        lease_owner="'w:1'",
        lease_expires_at="now() + interval '1 hour'",
        cancel_requested_at="now()",
    )
    claim = Claim(uuid.UUID(query_id), 1, "p", None, "sim-small", None, None)

    async def write() -> str | None:
        conn = await asyncpg.connect(stack.settings.database_url)
        try:
            if outcome == "fail":
                return await queries_repo.fail_attempt(conn, claim, code="upstream_bad_request", message="rejected")
            if outcome == "retry":
                return await queries_repo.retry_attempt(
                    conn, claim, delay=timedelta(seconds=5), code="upstream_unavailable", message="try again"
                )
            return await queries_repo.complete_attempt(
                conn, claim, response="late", prompt_tokens=1, completion_tokens=2, total_tokens=3, latency_ms=10
            )
        finally:
            await conn.close()

    assert asyncio.run(write()) == "cancelled"
    stored = row(db, query_id)
    assert stored["status"] == "cancelled"
    assert stored["error_code"] == "cancelled"
    assert stored["response"] is None
    assert stored["finished_at"] is not None


def test_cancel_completed_is_409_and_another_users_is_404(client: httpx.Client, user: dict[str, Any]) -> None:
    query_id = client.post("/api/v1/query", json={"query": "quick"}, headers=user["headers"]).json()["query_id"]
    assert wait_terminal(client, user["headers"], query_id)["status"] == "completed"
    assert client.post(f"/api/v1/query/{query_id}/cancel", headers=user["headers"]).status_code == 409
    other = register_and_login(client)
    assert client.post(f"/api/v1/query/{query_id}/cancel", headers=other["headers"]).status_code == 404
    assert client.get(f"/api/v1/query/{query_id}", headers=user["headers"]).json()["status"] == "completed"


def test_cancelled_pending_query_is_never_run(
    client: httpx.Client, stack: Stack, user: dict[str, Any], db: Engine
) -> None:
    from shared.queue import Publisher

    query_id = _insert_pending(db, user["user_id"])
    assert client.post(f"/api/v1/query/{query_id}/cancel", headers=user["headers"]).status_code == 200
    publisher = Publisher(stack.settings)
    try:
        publisher.publish_sync(uuid.UUID(query_id))
    finally:
        publisher.close()
    marker = client.post("/api/v1/query", json={"query": "after"}, headers=user["headers"]).json()["query_id"]
    wait_terminal(client, user["headers"], marker)
    stats = httpx.get(f"{stack.simulator_url}/_sim/stats").json()
    assert query_id not in stats["calls_by_query"]
    assert row(db, query_id)["status"] == "cancelled"


def _post_with_key(client: httpx.Client, user: dict[str, Any], key: str, body: dict[str, Any]) -> httpx.Response:
    return client.post("/api/v1/query", json=body, headers={**user["headers"], "Idempotency-Key": key})


def test_same_key_and_body_replays_the_original_response(
    client: httpx.Client, user: dict[str, Any], db: Engine
) -> None:
    key = f"k-{uuid.uuid4()}"
    body = {"query": "idempotent please", "temperature": 0.5}
    first = _post_with_key(client, user, key, body)
    second = _post_with_key(client, user, key, body)
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()
    assert second.headers["idempotent-replayed"] == "true"
    assert second.headers["location"] == first.headers["location"]
    assert count_rows(db, "SELECT count(*) FROM queries WHERE user_id = :u", u=user["user_id"]) == 1


def test_same_key_with_another_body_is_422(client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    key = f"k-{uuid.uuid4()}"
    assert _post_with_key(client, user, key, {"query": "one"}).status_code == 202
    r = _post_with_key(client, user, key, {"query": "two"})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "idempotency_key_reused"
    assert count_rows(db, "SELECT count(*) FROM queries WHERE user_id = :u", u=user["user_id"]) == 1


def test_keys_are_scoped_per_user(client: httpx.Client, user: dict[str, Any]) -> None:
    key = f"shared-{uuid.uuid4()}"
    other = register_and_login(client)
    mine = _post_with_key(client, user, key, {"query": "same"}).json()["query_id"]
    theirs = _post_with_key(client, other, key, {"query": "same"}).json()["query_id"]
    assert mine != theirs


def test_key_in_progress_is_409(client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    key = f"k-{uuid.uuid4()}"
    # Hold the key's lock the way a concurrent request with the same key does while it runs.
    with db.connect() as conn, conn.begin():
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": f"{user['user_id']}:{key}"})
        r = _post_with_key(client, user, key, {"query": "racing"})
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "idempotency_key_in_use"
    assert _post_with_key(client, user, key, {"query": "racing"}).status_code == 202


def test_malformed_key_is_400(client: httpx.Client, user: dict[str, Any]) -> None:
    for key in ("", "x" * 256, "has space"):
        r = _post_with_key(client, user, key, {"query": "hi"})
        assert r.status_code == 400, key
        assert r.json()["error"]["code"] == "invalid_idempotency_key"


def test_keys_are_kept_at_least_24_hours(client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    key = f"k-{uuid.uuid4()}"
    _post_with_key(client, user, key, {"query": "keep me"})
    with db.connect() as conn:
        created, expires = conn.execute(
            text("SELECT created_at, expires_at FROM idempotency_keys WHERE user_id = :u AND key = :k"),
            {"u": user["user_id"], "k": key},
        ).one()
    assert isinstance(created, datetime)
    assert (expires - created).total_seconds() >= 24 * 3600 - 1
