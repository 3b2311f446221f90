"""Usage reports, erasing a query, deleting an account, admin reads and requeues, the retention purge."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession

from shared.repositories import queries_session
from tests.support.api import TEST_PASSWORD, register_and_login, wait_terminal
from tests.support.db import insert_query, insert_user, row
from tests.support.limits import limits_redis, make_admin
from tests.support.polling import wait_until
from tests.support.stack import Stack


def _insert_done(db: Engine, user_id: str, model: str, created: str, tokens: tuple[int, int], reserved: int) -> str:
    prompt, completion = tokens
    query_id = insert_query(
        db,
        user_id,
        status="'completed'",
        created_at=created,
        finished_at=created,
        prompt_tokens=str(prompt),
        completion_tokens=str(completion),
        total_tokens=str(prompt + completion),
        reserved_tokens=str(reserved),
    )
    with db.begin() as conn:
        conn.execute(text("UPDATE queries SET model = :m WHERE id = :id"), {"m": model, "id": query_id})
    return query_id


def test_usage_sums_match_the_rows(client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    uid = user["user_id"]
    _insert_done(db, uid, "sim-small", "'2026-03-01 10:00+00'", (10, 5), 100)
    _insert_done(db, uid, "sim-small", "'2026-03-01 23:59+00'", (20, 7), 200)
    _insert_done(db, uid, "sim-large", "'2026-03-02 00:01+00'", (1, 1), 50)
    _insert_done(db, uid, "sim-large", "'2026-04-01 00:00+00'", (99, 99), 999)  # outside the period
    params = {"from": "2026-03-01T00:00:00Z", "to": "2026-03-03T00:00:00Z"}
    by_day = client.get("/api/v1/usage", params={**params, "group_by": "day"}, headers=user["headers"])
    assert by_day.status_code == 200, by_day.text
    body = by_day.json()
    assert [(i["key"], i["queries"], i["total_tokens"], i["reserved_tokens"]) for i in body["items"]] == [
        ("2026-03-01", 2, 42, 300),
        ("2026-03-02", 1, 2, 50),
    ]
    by_model = client.get("/api/v1/usage", params={**params, "group_by": "model"}, headers=user["headers"]).json()
    assert {i["key"]: i["prompt_tokens"] for i in by_model["items"]} == {"sim-large": 1, "sim-small": 30}
    with db.connect() as conn:
        sums = conn.execute(
            text(
                "SELECT count(*), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), sum(reserved_tokens)"
                " FROM queries WHERE user_id = :u AND created_at >= :f AND created_at < :t"
            ),
            {"u": uid, "f": params["from"], "t": params["to"]},
        ).one()
    totals = body["totals"]
    expected = [totals[k] for k in ("queries", "prompt_tokens", "completion_tokens", "total_tokens", "reserved_tokens")]
    assert list(sums) == expected
    assert by_model["totals"] == {**totals, "key": "total"}
    assert body["from"] == "2026-03-01T00:00:00Z"
    bad = client.get(
        "/api/v1/usage", params={"from": "2026-03-03T00:00:00Z", "to": "2026-03-01T00:00:00Z"}, headers=user["headers"]
    )
    assert bad.status_code == 422
    assert client.get("/api/v1/usage", params={"group_by": "week"}, headers=user["headers"]).status_code == 422
    # An instant is ISO 8601, never a bare number (which pydantic alone would read as Unix seconds).
    for bare in ("0.5", "1764547200", "-3"):
        r = client.get("/api/v1/usage", params={"to": bare}, headers=user["headers"])
        assert r.status_code == 422, (bare, r.text)
        assert r.json()["error"]["details"][0]["loc"] == ["query", "to"]
    assert client.get("/api/v1/usage", params={"to": "2026-03-01"}, headers=user["headers"]).status_code == 200


def test_only_admins_read_another_users_usage(client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    other = register_and_login(client)
    params = {"user_id": other["user_id"]}
    refused = client.get("/api/v1/usage", params=params, headers=user["headers"])
    assert refused.status_code == 403
    make_admin(db, user["user_id"])
    r = client.get("/api/v1/usage", params=params, headers=user["headers"])
    assert r.status_code == 200
    assert r.json()["user_id"] == other["user_id"]
    missing = client.get("/api/v1/usage", params={"user_id": str(uuid.uuid4())}, headers=user["headers"])
    assert missing.status_code == 404


@pytest.mark.parametrize("params", [{"to": "0001-01-01T00:00:00Z"}, {"to": "0001-01-10T00:00:00-14:00"}])
def test_a_period_before_the_calendar_starts_is_422(
    client: httpx.Client, user: dict[str, Any], params: dict[str, str]
) -> None:
    # The default `from` is `to` minus 30 days: before year 1 it cannot be represented.
    r = client.get("/api/v1/usage", params=params, headers=user["headers"])
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_period")


def test_an_admins_api_key_cannot_read_another_users_usage(
    client: httpx.Client, user: dict[str, Any], db: Engine
) -> None:
    # Admin work needs an access token, as on every admin route: a leaked key must not reach other users.
    other = register_and_login(client)
    make_admin(db, user["user_id"])
    key = client.post("/api/v1/keys", json={"name": "reports"}, headers=user["headers"]).json()["key"]
    as_key = {"Authorization": f"Bearer {key}"}
    refused = client.get("/api/v1/usage", params={"user_id": other["user_id"]}, headers=as_key)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "access_token_required"
    own = client.get("/api/v1/usage", params={"user_id": user["user_id"]}, headers=as_key)
    assert own.status_code == 200
    assert client.get("/api/v1/usage", headers=as_key).status_code == 200


def test_delete_erases_the_content_and_keeps_the_usage(client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    r = client.post("/api/v1/query", json={"query": "secret plans", "metadata": {"k": "v"}}, headers=user["headers"])
    query_id = r.json()["query_id"]
    done = wait_terminal(client, user["headers"], query_id)
    assert client.delete(f"/api/v1/query/{query_id}", headers=user["headers"]).status_code == 204
    assert client.get(f"/api/v1/query/{query_id}", headers=user["headers"]).status_code == 404
    assert client.delete(f"/api/v1/query/{query_id}", headers=user["headers"]).status_code == 404
    listed = client.get("/api/v1/query", headers=user["headers"]).json()["items"]
    assert query_id not in [q["query_id"] for q in listed]
    erased = row(db, query_id)
    assert (erased["prompt"], erased["response"], erased["metadata"], erased["system"]) == ("", None, None, None)
    assert erased["total_tokens"] == done["usage"]["total_tokens"]
    assert erased["deleted_at"] is not None
    usage = client.get("/api/v1/usage", headers=user["headers"]).json()
    assert usage["totals"]["total_tokens"] == done["usage"]["total_tokens"]


def test_delete_cancels_a_pending_query_and_refuses_a_running_one(
    client: httpx.Client, user: dict[str, Any], db: Engine
) -> None:
    pending = insert_query(db, user["user_id"], next_attempt_at="now() + interval '1 hour'")
    assert client.delete(f"/api/v1/query/{pending}", headers=user["headers"]).status_code == 204
    assert (row(db, pending)["status"], row(db, pending)["prompt"]) == ("cancelled", "")
    running = insert_query(
        db, user["user_id"], status="'running'", attempts="1", lease_expires_at="now() + interval '1 hour'"
    )
    r = client.delete(f"/api/v1/query/{running}", headers=user["headers"])
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "query_running"
    other = register_and_login(client)
    assert client.delete(f"/api/v1/query/{pending}", headers=other["headers"]).status_code == 404


def test_deleting_an_account_erases_its_queries(client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    query_id = client.post("/api/v1/query", json={"query": "mine"}, headers=user["headers"]).json()["query_id"]
    wait_terminal(client, user["headers"], query_id)
    assert client.delete("/api/v1/users/me", headers=user["headers"]).status_code == 204
    with db.connect() as conn:
        left = conn.execute(text("SELECT count(*) FROM queries WHERE user_id = :u"), {"u": user["user_id"]}).scalar()
    assert left == 0
    login = client.post("/api/v1/auth/login", json={"email": user["email"], "password": TEST_PASSWORD})
    assert login.status_code == 401


def test_deleting_an_account_erases_its_event_logs_and_cached_answers(
    stack: Stack, client: httpx.Client, user: dict[str, Any]
) -> None:
    # The event log holds the answer's text (as DELETE of one query knows), the per-user cache the answer too.
    body = {"query": f"my private question {uuid.uuid4().hex}", "cache": True}
    query_id = client.post("/api/v1/query", json=body, headers=user["headers"]).json()["query_id"]
    wait_terminal(client, user["headers"], query_id)
    r = limits_redis(stack)
    prefix = f"aiq:{stack.settings.queue_name}"
    cached = f"{prefix}:cache:user:{user['user_id']}:*"
    wait_until(lambda: list(r.scan_iter(cached)), timeout=10)
    assert r.exists(f"{prefix}:ev:{query_id}")
    assert client.delete("/api/v1/users/me", headers=user["headers"]).status_code == 204
    assert not r.exists(f"{prefix}:ev:{query_id}", f"{prefix}:ev:{query_id}:seq")
    assert list(r.scan_iter(cached)) == []


def test_admin_reads_any_query_and_the_read_is_logged(
    stack: Stack, client: httpx.Client, user: dict[str, Any], db: Engine
) -> None:
    other = register_and_login(client)
    prompt = f"private-{uuid.uuid4().hex}"
    query_id = client.post("/api/v1/query", json={"query": prompt}, headers=other["headers"]).json()["query_id"]
    assert client.get(f"/api/v1/admin/queries/{query_id}", headers=user["headers"]).status_code == 403
    make_admin(db, user["user_id"])
    r = client.get(f"/api/v1/admin/queries/{query_id}", headers=user["headers"])
    assert r.status_code == 200
    assert r.json()["query"] == prompt
    assert client.get(f"/api/v1/admin/queries/{uuid.uuid4()}", headers=user["headers"]).status_code == 404
    logs = stack.read_logs()
    assert any(
        "admin read a query" in line and user["user_id"] in line and other["user_id"] in line
        for line in logs.splitlines()
    )
    assert prompt not in logs


def test_admin_requeues_a_failed_query(client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    # Fails with 500 three times (MAX_ATTEMPTS=3 in the test stack), then the simulator would answer.
    body = {"query": f"flaky {uuid.uuid4().hex} [[sim fail=500 times=3]]"}
    query_id = client.post("/api/v1/query", json=body, headers=user["headers"]).json()["query_id"]
    failed = wait_terminal(client, user["headers"], query_id)
    assert failed["status"] == "failed"
    url = f"/api/v1/admin/queries/{query_id}/requeue"
    assert client.post(url, headers=user["headers"]).status_code == 403
    make_admin(db, user["user_id"])
    r = client.post(url, headers=user["headers"])
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "pending"
    done = wait_terminal(client, user["headers"], query_id)
    assert (done["status"], done["attempts"]) == ("completed", 4)
    again = client.post(url, headers=user["headers"])
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "query_not_failed"


@pytest.mark.anyio
async def test_retention_purges_old_terminal_rows_in_batches(repo_session: AsyncSession, repo_db: Engine) -> None:
    user_id = insert_user(repo_db)
    old = [
        insert_query(repo_db, user_id, status="'completed'", finished_at="now() - interval '40 days'") for _ in range(3)
    ]
    recent = insert_query(repo_db, user_id, status="'completed'", finished_at="now() - interval '1 day'")
    live = insert_query(repo_db, user_id, status="'pending'")
    cutoff = datetime.now(UTC) - timedelta(days=30)
    assert await queries_session.purge_finished_before(repo_session, cutoff, 2) == 2
    assert await queries_session.purge_finished_before(repo_session, cutoff, 2) >= 1
    await repo_session.commit()
    with repo_db.connect() as conn:
        ids = {
            str(i) for i in conn.execute(text("SELECT id FROM queries WHERE user_id = :u"), {"u": user_id}).scalars()
        }
    assert not ids & set(old)
    assert {recent, live} <= ids
