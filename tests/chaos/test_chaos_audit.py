"""The harness's own instruments: a chaos run that cannot see a double write or a reclaim proves nothing.

Drives rows of a migrated database through hand-written transitions (the way a buggy worker or sweeper
would) and checks that the audit triggers and the report's accounting see exactly what happened.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.chaos import audit
from bench.chaos._watchdog import Reaper
from bench.chaos.harness import KillRecord
from bench.chaos.report import kill_accounting, terminal_double_writes
from bench.chaos.services import OwnPostgres
from devkit import embedded
from devkit.migrations import migrate


@pytest.fixture(scope="module")
def audited_db() -> Iterator[str]:
    reaper = Reaper()
    base = Path(tempfile.mkdtemp(prefix="aiqa-", dir="/tmp"))
    reaper.add_tree(base)
    pg = OwnPostgres(base, reaper)
    try:
        pg.init()
        pg.start()
        url = embedded.create_database(pg.url, "chaos_audit")
        migrate(url)
        audit.install(url)
        yield url
    finally:
        pg.close()
        reaper.disarm()
        shutil.rmtree(base, ignore_errors=True)


def _exec(url: str, sql: str, *params: Any) -> None:
    conn = audit.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
    finally:
        conn.close()


def _new_query(url: str) -> str:
    user, qid = str(uuid.uuid4()), str(uuid.uuid4())
    _exec(url, "INSERT INTO users (id, email, password_hash) VALUES (%s, %s, 'x')", user, f"{user}@example.com")
    _exec(url, "INSERT INTO queries (id, user_id, prompt, model) VALUES (%s, %s, 'p', 'm')", qid, user)
    return qid


def _claim(url: str, qid: str, owner: str, lease_s: float) -> None:
    _exec(
        url,
        "UPDATE queries SET status = 'running', attempts = attempts + 1, lease_owner = %s, "
        "lease_expires_at = now() + make_interval(secs => %s) WHERE id = %s",
        owner,
        lease_s,
        qid,
    )


def test_triggers_and_accounting_see_double_writes_and_reclaims(audited_db: str) -> None:
    url = audited_db
    # A clean life: claim, complete. Nothing to report.
    clean = _new_query(url)
    _claim(url, clean, "host:100", 30)
    _exec(url, "UPDATE queries SET status = 'completed', lease_owner = NULL WHERE id = %s", clean)

    # A terminal row updated again, even without a status change: written twice.
    rewritten = _new_query(url)
    _claim(url, rewritten, "host:100", 30)
    _exec(url, "UPDATE queries SET status = 'completed' WHERE id = %s", rewritten)
    _exec(url, "UPDATE queries SET response = 'late answer' WHERE id = %s", rewritten)

    # A row that leaves a terminal state and enters one again: written twice.
    reopened = _new_query(url)
    _claim(url, reopened, "host:100", 30)
    _exec(url, "UPDATE queries SET status = 'failed' WHERE id = %s", reopened)
    _exec(url, "UPDATE queries SET status = 'running' WHERE id = %s", reopened)
    _exec(url, "UPDATE queries SET status = 'completed' WHERE id = %s", reopened)

    # A worker (pid 222) claims, is SIGKILLed, the sweeper reclaims the expired lease, another attempt ends it.
    started = time.time() - 1
    killed_row = _new_query(url)
    _claim(url, killed_row, "host:222", 0.01)
    killed_at = time.time()
    time.sleep(0.05)
    _exec(
        url,
        "UPDATE queries SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL WHERE id = %s",
        killed_row,
    )
    _claim(url, killed_row, "host:333", 30)
    _exec(url, "UPDATE queries SET status = 'completed', lease_owner = NULL WHERE id = %s", killed_row)

    # A live worker (pid 444) whose lease ran out: the reclaim is not explained by any kill.
    starved = _new_query(url)
    _claim(url, starved, "host:444", 0.01)
    time.sleep(0.05)
    _exec(
        url, "UPDATE queries SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL WHERE id = %s", starved
    )

    data = audit.fetch(url)
    doubles = terminal_double_writes(data["rewrites"], data["transitions"])
    assert doubles["ids"] == {rewritten, reopened}
    assert set(doubles["rewritten"]) == {rewritten, reopened}
    assert set(doubles["multi_terminal"]) == {reopened}

    by_query: dict[str, list[audit.Transition]] = defaultdict(list)
    for tr in data["transitions"]:
        by_query[tr.query_id].append(tr)
    # pid 222 again later (a reused pid) must not be blamed for the first process's claims, and vice versa.
    kills = [KillRecord(222, started, killed_at), KillRecord(444, killed_at + 3600, killed_at + 7200)]
    acct = kill_accounting(by_query, kills)
    assert acct["abandoned"] == [(killed_row, 1)]
    assert acct["reclaims"] == 2
    assert acct["reclaims_after_kill"] == 1
    assert [t.query_id for t in acct["reclaims_from_live_workers"]] == [starved]

    _exec(url, "DELETE FROM queries WHERE id = %s", clean)
    assert [d["query_id"] for d in audit.fetch(url)["deleted"]] == [clean]
