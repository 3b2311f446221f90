"""The query repositories' guarded writes, called directly on real handles.

These are the rules that keep a row honest when workers race, die or get cancelled: a claim fences every
later write by its attempt number, a cancel wins over a late outcome, and the sweeper takes back only
leases that really expired. Each test makes its own user and rows on a database no worker sweeps.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import QueryStatus
from shared.repositories import queries_asyncpg, queries_session
from shared.repositories.queries_asyncpg import Claim
from tests.support.db import insert_query, insert_user, row

pytestmark = pytest.mark.anyio

LEASE = timedelta(seconds=60)
MAX_ATTEMPTS = 3
STALE = timedelta(minutes=5)
# Every sweep takes all matching rows, so a test's own rows are never left out by the batch size.
BATCH = 10_000

Write = Callable[[asyncpg.Connection, Claim], Awaitable[QueryStatus | None]]


async def _complete(conn: asyncpg.Connection, claim: Claim) -> QueryStatus | None:
    return await queries_asyncpg.complete_attempt(
        conn, claim, response="an answer", prompt_tokens=3, completion_tokens=5, total_tokens=8, latency_ms=40
    )


async def _fail(conn: asyncpg.Connection, claim: Claim) -> QueryStatus | None:
    return await queries_asyncpg.fail_attempt(conn, claim, code="upstream_bad_request", message="rejected")


async def _retry(conn: asyncpg.Connection, claim: Claim) -> QueryStatus | None:
    return await queries_asyncpg.retry_attempt(conn, claim, delay=timedelta(0), code="upstream_5xx", message="again")


async def _cancel(conn: asyncpg.Connection, claim: Claim) -> QueryStatus | None:
    return await queries_asyncpg.cancel_attempt(conn, claim)


async def _release(conn: asyncpg.Connection, claim: Claim) -> QueryStatus | None:
    return await queries_asyncpg.release_attempt(conn, claim)


EVERY_WRITE = pytest.mark.parametrize(
    "write", [_complete, _fail, _retry, _cancel, _release], ids=["complete", "fail", "retry", "cancel", "release"]
)


@pytest.fixture
def user_id(repo_db: Engine) -> str:
    """A user of this test alone."""
    return insert_user(repo_db)


def _insert(repo_db: Engine, user_id: str, **sql: str) -> uuid.UUID:
    return uuid.UUID(insert_query(repo_db, user_id, **sql))


def _row(repo_db: Engine, query_id: uuid.UUID) -> dict[str, Any]:
    return row(repo_db, str(query_id))


async def _claim(conn: asyncpg.Connection, query_id: uuid.UUID, owner: str = "worker-a") -> Claim:
    claim = await queries_asyncpg.claim(conn, query_id, owner, LEASE)
    assert claim is not None
    return claim


async def test_a_claim_takes_a_pending_row_once(repo_conn: asyncpg.Connection, repo_db: Engine, user_id: str) -> None:
    query_id = _insert(repo_db, user_id)

    claim = await _claim(repo_conn, query_id)

    assert (claim.query_id, claim.attempt) == (query_id, 1)
    taken = _row(repo_db, query_id)
    assert (taken["status"], taken["attempts"], taken["lease_owner"]) == ("running", 1, "worker-a")
    assert taken["lease_expires_at"] is not None
    assert taken["started_at"] is not None
    assert await queries_asyncpg.claim(repo_conn, query_id, "worker-b", LEASE) is None
    assert _row(repo_db, query_id) == taken


async def test_a_row_not_yet_due_cannot_be_claimed(
    repo_conn: asyncpg.Connection, repo_db: Engine, user_id: str
) -> None:
    query_id = _insert(repo_db, user_id, next_attempt_at="now() + interval '1 hour'")
    before = _row(repo_db, query_id)

    assert await queries_asyncpg.claim(repo_conn, query_id, "worker-a", LEASE) is None
    assert _row(repo_db, query_id) == before


@EVERY_WRITE
async def test_a_stale_attempt_writes_nothing_and_the_current_one_still_can(
    write: Write, repo_conn: asyncpg.Connection, repo_db: Engine, user_id: str
) -> None:
    query_id = _insert(repo_db, user_id)
    first = await _claim(repo_conn, query_id, "worker-a")
    # The row is handed back (a shutting-down worker, or the sweeper) and another worker claims it again.
    assert await _release(repo_conn, first) == QueryStatus.PENDING
    second = await _claim(repo_conn, query_id, "worker-b")
    assert second.attempt == first.attempt + 1
    before = _row(repo_db, query_id)

    assert await write(repo_conn, first) is None

    assert _row(repo_db, query_id) == before
    assert await _complete(repo_conn, second) == QueryStatus.COMPLETED


async def test_the_owning_attempts_answer_lands(repo_conn: asyncpg.Connection, repo_db: Engine, user_id: str) -> None:
    query_id = _insert(repo_db, user_id)
    claim = await _claim(repo_conn, query_id)

    assert await _complete(repo_conn, claim) == QueryStatus.COMPLETED

    done = _row(repo_db, query_id)
    assert (done["status"], done["response"], done["total_tokens"]) == ("completed", "an answer", 8)
    assert (done["lease_owner"], done["lease_expires_at"]) == (None, None)
    assert done["finished_at"] is not None


@EVERY_WRITE
async def test_a_terminal_row_is_never_written_again(
    write: Write, repo_conn: asyncpg.Connection, repo_db: Engine, user_id: str
) -> None:
    query_id = _insert(repo_db, user_id)
    claim = await _claim(repo_conn, query_id)
    assert await _complete(repo_conn, claim) == QueryStatus.COMPLETED
    before = _row(repo_db, query_id)

    assert await write(repo_conn, claim) is None
    assert await queries_asyncpg.claim(repo_conn, query_id, "worker-b", LEASE) is None

    assert _row(repo_db, query_id) == before


@pytest.mark.parametrize("write", [_complete, _fail, _retry], ids=["complete", "fail", "retry"])
async def test_a_cancel_requested_while_running_wins_over_the_outcome(
    write: Write, repo_conn: asyncpg.Connection, repo_db: Engine, user_id: str
) -> None:
    query_id = _insert(repo_db, user_id)
    claim = await _claim(repo_conn, query_id)
    marked = await queries_asyncpg.request_cancel(repo_conn, query_id, uuid.UUID(user_id))
    assert marked is not None
    assert marked["status"] == "running"
    assert marked["cancel_requested_at"] is not None

    assert await write(repo_conn, claim) == QueryStatus.CANCELLED

    ended = _row(repo_db, query_id)
    assert (ended["status"], ended["response"], ended["error_code"]) == ("cancelled", None, "cancelled")
    assert ended["finished_at"] is not None
    assert (ended["lease_owner"], ended["lease_expires_at"]) == (None, None)
    if write is _complete:
        # The call was paid for: its usage stays on the row even though the answer is dropped.
        assert (ended["prompt_tokens"], ended["completion_tokens"], ended["total_tokens"]) == (3, 5, 8)


async def test_cancelling_a_pending_row_ends_it_at_once(
    repo_conn: asyncpg.Connection, repo_db: Engine, user_id: str
) -> None:
    query_id = _insert(repo_db, user_id)

    ended = await queries_asyncpg.cancel_pending(repo_conn, query_id, uuid.UUID(user_id))

    assert ended is not None
    assert (ended["status"], ended["error_code"]) == ("cancelled", "cancelled")
    assert ended["finished_at"] is not None
    assert await queries_asyncpg.claim(repo_conn, query_id, "worker-a", LEASE) is None
    assert _row(repo_db, query_id)["status"] == "cancelled"


async def test_only_the_owner_cancels_and_only_in_the_right_state(
    repo_conn: asyncpg.Connection, repo_db: Engine, user_id: str
) -> None:
    pending = _insert(repo_db, user_id)
    running = _insert(repo_db, user_id)
    await _claim(repo_conn, running)
    stranger = uuid.UUID(insert_user(repo_db))
    before = {query_id: _row(repo_db, query_id) for query_id in (pending, running)}

    assert await queries_asyncpg.cancel_pending(repo_conn, pending, stranger) is None
    assert await queries_asyncpg.request_cancel(repo_conn, running, stranger) is None
    assert await queries_asyncpg.cancel_pending(repo_conn, running, uuid.UUID(user_id)) is None
    assert await queries_asyncpg.request_cancel(repo_conn, pending, uuid.UUID(user_id)) is None

    assert {query_id: _row(repo_db, query_id) for query_id in (pending, running)} == before


def _running(repo_db: Engine, user_id: str, lease_expires_at: str, **sql: str) -> uuid.UUID:
    """A row some worker claimed, with the given lease."""
    columns = {"status": "'running'", "attempts": "1", "lease_owner": "'worker-gone'", **sql}
    return _insert(repo_db, user_id, lease_expires_at=lease_expires_at, **columns)


@pytest.mark.parametrize(
    ("sql", "status", "error_code"),
    [
        ({}, "pending", None),
        ({"attempts": str(MAX_ATTEMPTS)}, "failed", "worker_lost"),
        ({"cancel_requested_at": "now()"}, "cancelled", "cancelled"),
    ],
    ids=["handed-back", "attempts-exhausted", "cancel-requested"],
)
async def test_the_sweeper_takes_back_an_expired_lease(
    sql: dict[str, str],
    status: str,
    error_code: str | None,
    repo_session: AsyncSession,
    repo_db: Engine,
    user_id: str,
) -> None:
    expired = _running(repo_db, user_id, "now() - interval '1 second'", **sql)

    reclaimed = dict(await queries_session.reclaim_expired_leases(repo_session, MAX_ATTEMPTS, STALE, BATCH))
    assert reclaimed[expired] == status
    await repo_session.commit()

    swept = _row(repo_db, expired)
    assert (swept["status"], swept["error_code"]) == (status, error_code)
    assert (swept["lease_owner"], swept["lease_expires_at"]) == (None, None)
    assert (swept["finished_at"] is None) == (status == "pending")


async def test_the_sweeper_leaves_a_live_lease_alone(repo_session: AsyncSession, repo_db: Engine, user_id: str) -> None:
    live = _running(repo_db, user_id, "now() + interval '1 hour'")
    before = _row(repo_db, live)

    await queries_session.reclaim_expired_leases(repo_session, MAX_ATTEMPTS, STALE, BATCH)
    await repo_session.commit()

    assert _row(repo_db, live) == before


async def test_a_handed_back_row_is_resent_by_the_same_sweep(
    repo_session: AsyncSession, repo_db: Engine, user_id: str
) -> None:
    expired = _running(repo_db, user_id, "now() - interval '1 second'")

    await queries_session.reclaim_expired_leases(repo_session, MAX_ATTEMPTS, STALE, BATCH)

    assert expired in {q for q, _ in await queries_session.lock_stale_pending(repo_session, STALE, BATCH)}


async def test_only_due_stale_pending_rows_are_picked_for_resending(
    repo_session: AsyncSession, repo_db: Engine, user_id: str
) -> None:
    long_ago = "now() - interval '1 hour'"
    stale = _insert(repo_db, user_id, updated_at=long_ago)
    fresh = _insert(repo_db, user_id)
    not_due = _insert(repo_db, user_id, updated_at=long_ago, next_attempt_at="now() + interval '1 hour'")
    running = _running(repo_db, user_id, "now() + interval '1 hour'", updated_at=long_ago)
    finished = _insert(repo_db, user_id, updated_at=long_ago, status="'completed'", finished_at=long_ago)

    picked = {q for q, _ in await queries_session.lock_stale_pending(repo_session, STALE, BATCH)}

    assert stale in picked
    assert picked.isdisjoint({fresh, not_due, running, finished})


async def test_renewal_extends_only_running_leases_of_that_worker(
    repo_conn: asyncpg.Connection, repo_session: AsyncSession, repo_db: Engine, user_id: str
) -> None:
    mine = await _claim(repo_conn, _insert(repo_db, user_id), "worker-a")
    cancelled = await _claim(repo_conn, _insert(repo_db, user_id), "worker-a")
    await queries_asyncpg.request_cancel(repo_conn, cancelled.query_id, uuid.UUID(user_id))
    theirs = await _claim(repo_conn, _insert(repo_db, user_id), "worker-b")
    finished = await _claim(repo_conn, _insert(repo_db, user_id), "worker-a")
    await _complete(repo_conn, finished)
    before = {c.query_id: _row(repo_db, c.query_id) for c in (mine, cancelled, theirs, finished)}
    held = [(c.query_id, c.attempt) for c in (mine, cancelled, theirs, finished)]

    renewed = await queries_session.renew_leases(repo_session, held, "worker-a", timedelta(hours=1))
    await repo_session.commit()

    assert renewed == {mine.query_id: False, cancelled.query_id: True}
    for claim in (mine, cancelled):
        assert _row(repo_db, claim.query_id)["lease_expires_at"] > before[claim.query_id]["lease_expires_at"] + LEASE
    for claim in (theirs, finished):
        assert _row(repo_db, claim.query_id) == before[claim.query_id]


async def test_renewal_for_a_stale_attempt_does_nothing(
    repo_conn: asyncpg.Connection, repo_session: AsyncSession, repo_db: Engine, user_id: str
) -> None:
    query_id = _insert(repo_db, user_id)
    first = await _claim(repo_conn, query_id, "worker-a")
    await _release(repo_conn, first)
    second = await _claim(repo_conn, query_id, "worker-a")
    before = _row(repo_db, query_id)

    renewed = await queries_session.renew_leases(
        repo_session, [(query_id, first.attempt)], "worker-a", timedelta(hours=1)
    )
    await repo_session.commit()

    assert renewed == {}
    assert second.attempt == first.attempt + 1
    assert _row(repo_db, query_id) == before


async def test_a_claim_says_whether_its_query_has_a_webhook_target(
    repo_conn: asyncpg.Connection, repo_db: Engine, user_id: str
) -> None:
    # The worker's end sends the `webhooks.deliver` kick (one UPDATE … RETURNING) only when this is true.
    plain = await _claim(repo_conn, _insert(repo_db, user_id))
    own_url = await _claim(repo_conn, _insert(repo_db, user_id, webhook_url="'https://hooks.example.com/q'"))
    assert (plain.webhook, own_url.webhook) == (False, True)

    with repo_db.begin() as conn:
        conn.execute(
            text("INSERT INTO webhook_endpoints (user_id, secret, url) VALUES (:u, 'whsec_test', :url)"),
            {"u": user_id, "url": "https://hooks.example.com/account"},
        )
    assert (await _claim(repo_conn, _insert(repo_db, user_id))).webhook is True
    # The dispatcher's claim says the same; a model of this test alone, so no other row is picked.
    model = f"sim-hook-{uuid.uuid4().hex[:8]}"
    fair_id = _insert(repo_db, user_id)
    with repo_db.begin() as conn:
        conn.execute(text("UPDATE queries SET model = :m WHERE id = :id"), {"m": model, "id": fair_id})
    fair = await queries_asyncpg.claim_next_fair(repo_conn, model, "worker-a", LEASE, timedelta(0))
    assert fair is not None
    assert (fair.query_id, fair.webhook) == (fair_id, True)

    with repo_db.begin() as conn:
        conn.execute(text("UPDATE webhook_endpoints SET disabled_at = now() WHERE user_id = :u"), {"u": user_id})
    assert (await _claim(repo_conn, _insert(repo_db, user_id))).webhook is False
