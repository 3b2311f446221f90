"""Fair turns between users and priorities: the fair claim on real PostgreSQL, then end to end with workers.

The repository tests use a model name of their own, so no other test's rows are candidates of their claims.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from shared.models import QueryStatus
from shared.repositories import queries_asyncpg
from tests.support.api import register_and_login
from tests.support.db import insert_user, row
from tests.support.flow import limited_stack, submit_many

LEASE = timedelta(seconds=60)
AGEING = timedelta(minutes=5)


def _insert(db: Engine, user_id: str, model: str, *, status: str = "pending", priority: str = "interactive",
            age_seconds: float = 0) -> str:  # fmt: skip
    query_id = str(uuid.uuid4())
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO queries (id, user_id, prompt, model, status, priority, created_at, next_attempt_at) "
                "VALUES (:id, :u, 'p', :m, :s, :pr, now() - make_interval(secs => :age), "
                "now() - make_interval(secs => :age))"
            ),
            {"id": query_id, "u": user_id, "m": model, "s": status, "pr": priority, "age": age_seconds},
        )
    return query_id


async def _next(conn: asyncpg.Connection, model: str) -> str | None:
    claim = await queries_asyncpg.claim_next_fair(conn, model, "test-owner", LEASE, AGEING)
    return str(claim.query_id) if claim is not None else None


@pytest.mark.anyio
async def test_a_user_with_a_backlog_does_not_delay_another_users_query_by_more_than_a_turn(
    repo_conn: asyncpg.Connection, repo_db: Engine
) -> None:
    model = f"fair-{uuid.uuid4().hex[:8]}"
    a, b = insert_user(repo_db), insert_user(repo_db)
    backlog = [_insert(repo_db, a, model, age_seconds=60 - i) for i in range(30)]
    first = await _next(conn=repo_conn, model=model)
    assert first == backlog[0]
    # B's one query arrives after all of A's: it goes next, because A already has a call in flight.
    late = _insert(repo_db, b, model)
    assert await _next(repo_conn, model) == late
    # Then A's backlog, oldest first.
    assert await _next(repo_conn, model) == backlog[1]
    assert await _next(repo_conn, model) == backlog[2]


async def _owner(conn: asyncpg.Connection, db: Engine, model: str) -> str | None:
    claimed = await _next(conn, model)
    return None if claimed is None else str(row(db, claimed)["user_id"])


@pytest.mark.anyio
async def test_an_admin_set_weight_gives_a_user_that_many_turns(repo_conn: asyncpg.Connection, repo_db: Engine) -> None:
    model = f"fair-{uuid.uuid4().hex[:8]}"
    heavy, light = insert_user(repo_db), insert_user(repo_db)
    with repo_db.begin() as conn:
        conn.execute(text("INSERT INTO user_limits (user_id, fair_weight) VALUES (:u, 3)"), {"u": heavy})
    for i in range(12):
        _insert(repo_db, light, model, age_seconds=200 - i)
        _insert(repo_db, heavy, model, age_seconds=100 - i)
    owners = [await _owner(repo_conn, repo_db, model) for _ in range(8)]
    assert owners.count(heavy) == 6
    assert owners.count(light) == 2


@pytest.mark.anyio
async def test_a_user_over_its_share_cap_waits_while_others_have_work_but_never_idles_the_budget(
    repo_conn: asyncpg.Connection, repo_db: Engine
) -> None:
    model = f"fair-{uuid.uuid4().hex[:8]}"
    capped, other = insert_user(repo_db), insert_user(repo_db)
    with repo_db.begin() as conn:
        conn.execute(text("INSERT INTO user_limits (user_id, max_share) VALUES (:u, 0.25)"), {"u": capped})
    for _ in range(3):
        _insert(repo_db, capped, model, status="running")
    for i in range(3):
        _insert(repo_db, capped, model, age_seconds=100 - i)
    _insert(repo_db, other, model, age_seconds=1)
    # `capped` holds 3 of 3 calls in flight (cap 25 %): the other user's newer query goes first...
    assert await _owner(repo_conn, repo_db, model) == other
    # ...and with nobody else waiting, the capped user still gets the budget.
    assert await _owner(repo_conn, repo_db, model) == capped


@pytest.mark.anyio
async def test_batch_runs_after_interactive_work_unless_it_has_waited_past_the_ageing(
    repo_conn: asyncpg.Connection, repo_db: Engine
) -> None:
    model = f"prio-{uuid.uuid4().hex[:8]}"
    batch_user, user = insert_user(repo_db), insert_user(repo_db)
    old_batch = _insert(repo_db, batch_user, model, priority="batch", age_seconds=60)
    interactive = _insert(repo_db, user, model, age_seconds=1)
    assert await _next(repo_conn, model) == interactive
    assert await _next(repo_conn, model) == old_batch
    # Aged past BATCH_AGEING_SECONDS, a batch row ranks with interactive work (it never starves).
    aged = _insert(repo_db, batch_user, model, priority="batch", age_seconds=AGEING.total_seconds() + 60)
    fresh = _insert(repo_db, user, model, age_seconds=1)
    assert await _next(repo_conn, model) == aged
    assert await _next(repo_conn, model) == fresh
    assert await _next(repo_conn, model) is None


@pytest.mark.anyio
async def test_giving_a_claim_back_to_wait_for_budget_is_not_an_attempt(
    repo_conn: asyncpg.Connection, repo_db: Engine
) -> None:
    model = f"wait-{uuid.uuid4().hex[:8]}"
    query_id = _insert(repo_db, insert_user(repo_db), model)
    claim = await queries_asyncpg.claim_next_fair(repo_conn, model, "test-owner", LEASE, AGEING)
    assert claim is not None
    assert claim.attempt == 1
    status = await queries_asyncpg.unclaim_attempt(repo_conn, claim, delay=timedelta(0))
    assert status is QueryStatus.PENDING
    stored = row(repo_db, query_id)
    assert stored["attempts"] == 0
    assert stored["lease_owner"] is None
    assert stored["started_at"] is None
    # The unclaimed attempt number is fenced off: a stale write under it changes nothing.
    assert await queries_asyncpg.fail_attempt(repo_conn, claim, code="x", message="y") is None
    again = await queries_asyncpg.claim_next_fair(repo_conn, model, "test-owner", LEASE, AGEING)
    assert again is not None
    assert again.attempt == 1


@pytest.mark.usefixtures("stack_turn")
def test_end_to_end_a_second_users_queries_finish_within_a_turn_of_a_backlog_and_batch_waits(
    server_urls: dict[str, str], tmp_path: Path
) -> None:
    # 240 requests a minute (4 a second, a burst of 8): A's backlog of 60 takes about 13 s.
    sim = ["--latency-ms", "100", "--limit-rpm", "240", "--limit-burst-seconds", "2"]
    env = {"UPSTREAM_LIMITS": "sim-small=rpm:240", "UPSTREAM_PROBE_CONCURRENCY": "2"}
    with limited_stack(server_urls, tmp_path / "fair", sim_args=sim, env=env, workers=2) as stack:
        with httpx.Client(base_url=stack.api_url, timeout=30) as client:
            a, b, c = register_and_login(client), register_and_login(client), register_and_login(client)
        backlog = submit_many(stack.api_url, a["headers"], [f"a {i}" for i in range(60)])
        batch = submit_many(stack.api_url, c["headers"], [f"c {i}" for i in range(5)], priority="batch")
        time.sleep(3)
        submitted = time.monotonic()
        few = submit_many(stack.api_url, b["headers"], [f"b {i}" for i in range(3)])
        few_rows = stack.wait_all_terminal(few, timeout=60)
        b_done = time.monotonic() - submitted
        rows = stack.wait_all_terminal(backlog + batch, timeout=120)

    assert [r["status"] for r in few_rows] == ["completed"] * 3
    assert [r["status"] for r in rows] == ["completed"] * 65
    # B's 3 queries waited for about one turn each, not for A's backlog (which took over 10 s).
    assert b_done <= 6, b_done
    a_last = max(r["finished_at"] for r in rows if r["id"] in set(backlog))
    assert max(r["finished_at"] for r in few_rows) < a_last
    # Batch work ran on what interactive work left: after A's backlog, although submitted before most of it ran.
    # (`started_at` is a row's first claim, also one given back to wait: the finish times tell the order.)
    batch_first = min(r["finished_at"] for r in rows if r["id"] in set(batch))
    a_finished = sorted(r["finished_at"] for r in rows if r["id"] in set(backlog))
    assert batch_first > a_finished[-5]
    assert {r["priority"] for r in rows if r["id"] in set(batch)} == {"batch"}
