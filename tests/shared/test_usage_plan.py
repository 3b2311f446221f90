"""The usage query on 100k rows of one user: an index-only scan, and its EXPLAIN ANALYZE timing."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine

from shared.repositories.usage import usage_statement
from tests.support.db import insert_user

ROWS = 100_000


def _explain(repo_db: Engine, user_id: str, group_by: str) -> str:
    end = datetime.now(UTC)
    stmt = usage_statement(uuid.UUID(user_id), end - timedelta(days=365), end, group_by)
    sql = str(stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))  # type: ignore[no-untyped-call]
    with repo_db.connect() as conn:
        return "\n".join(r[0] for r in conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")))


_INSERT = text(
    "INSERT INTO queries (id, user_id, prompt, model, status, created_at, finished_at, prompt_tokens,"
    " completion_tokens, total_tokens, reserved_tokens)"
    " SELECT gen_random_uuid(), :u, 'p', CASE WHEN g % 3 = 0 THEN 'sim-large' ELSE 'sim-small' END,"
    " 'completed', now() - (g * interval '5 minutes'), now(), 10, 20, 30, 100"
    " FROM generate_series(1, :n) AS g"
)


@pytest.fixture(scope="module")
def heavy_user(repo_db: Engine) -> str:
    """A user with 100k queries, among 20 other users with 20k each."""
    user_id = insert_user(repo_db)
    with repo_db.begin() as conn:
        conn.execute(_INSERT, {"u": user_id, "n": ROWS})
        for _ in range(20):
            conn.execute(_INSERT, {"u": insert_user(repo_db), "n": ROWS // 5})
    with repo_db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE queries"))
    return user_id


@pytest.mark.parametrize("group_by", ["day", "model"])
def test_usage_of_100k_rows_is_an_index_only_scan(
    repo_db: Engine, heavy_user: str, group_by: str, capsys: pytest.CaptureFixture[str]
) -> None:
    user_id = heavy_user
    plan = _explain(repo_db, user_id, group_by)
    with capsys.disabled():
        print(f"\nusage group_by={group_by} over {ROWS} rows:\n{plan}")
    assert "Index Only Scan using ix_queries_user_usage" in plan
