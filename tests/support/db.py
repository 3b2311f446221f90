"""Reading and writing rows directly, the way an operator would, past the API and the worker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from devkit import embedded
from devkit.migrations import migrate


def count_rows(db: Engine, sql: str, **params: Any) -> int:
    """The single integer a `SELECT count(*) ...` returns."""
    with db.connect() as conn:
        return int(conn.execute(text(sql), params).scalar_one())


def row(db: Engine, query_id: str) -> dict[str, Any]:
    """The whole queries row, every column."""
    with db.connect() as conn:
        return dict(conn.execute(text("SELECT * FROM queries WHERE id = :id"), {"id": query_id}).mappings().one())


def insert_query(db: Engine, user_id: str, prompt: str = "stored directly", **sql: str) -> str:
    """Store a queries row without the API: a message never sent, an orphaned claim, a parked retry.

    Extra columns are given as SQL expressions (test-only, trusted), e.g. `status="'running'"`.
    """
    query_id = str(uuid.uuid4())
    columns = ", ".join(["id", "user_id", "prompt", "model", *sql])
    values = ", ".join([":id", ":u", ":p", "'sim-small'", *sql.values()])
    with db.begin() as conn:
        conn.execute(
            text(f"INSERT INTO queries ({columns}) VALUES ({values})"),  # noqa: S608 - test-only, literal input
            {"id": query_id, "u": user_id, "p": prompt},
        )
    return query_id


@contextmanager
def throwaway_database(server_url: str) -> Iterator[str]:
    """A new database on the server, migrated to head; dropped on exit."""
    name = f"aiq_test_{uuid.uuid4().hex[:12]}"
    url = embedded.create_database(server_url, name)
    try:
        migrate(url)
        yield url
    finally:
        embedded.drop_database(server_url, name)


def insert_user(db: Engine) -> str:
    """A users row with a unique email and no usable password; returns its id."""
    user_id = str(uuid.uuid4())
    with db.begin() as conn:
        conn.execute(
            text("INSERT INTO users (id, email, password_hash) VALUES (:id, :email, '!')"),
            {"id": user_id, "email": f"user-{user_id}@example.com"},
        )
    return user_id
