"""Harness-only audit triggers on `queries` (never a migration) and the reads the report is built from.

* `chaos_transitions`: one row per change of `status` or `attempts` (a claim, a retry, a reclaim, an end),
  with the lease before the change, so an attempt's life can be followed after the run.
* `chaos_terminal_rewrites`: one row per UPDATE of a row that was already completed/failed/cancelled.
  Any row here is a terminal row written twice, whatever the UPDATE changed.
* `chaos_deleted`: rows deleted from `queries` (nothing in AIQ should delete one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg2

TERMINAL = ("completed", "failed", "cancelled")

INSTALL_SQL = """
CREATE TABLE chaos_transitions (
    seq bigserial PRIMARY KEY,
    query_id uuid NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    txn_at timestamptz NOT NULL DEFAULT now(),
    old_status text,
    new_status text,
    old_attempts int,
    new_attempts int,
    old_lease_owner text,
    new_lease_owner text,
    old_lease_expires_at timestamptz,
    new_error_code text,
    app text DEFAULT current_setting('application_name', true)
);
CREATE INDEX chaos_transitions_query ON chaos_transitions (query_id, seq);

CREATE TABLE chaos_terminal_rewrites (
    seq bigserial PRIMARY KEY,
    query_id uuid NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    old_status text,
    new_status text,
    old_attempts int,
    new_attempts int,
    old_error_code text,
    new_error_code text,
    app text DEFAULT current_setting('application_name', true)
);

CREATE TABLE chaos_deleted (
    seq bigserial PRIMARY KEY,
    query_id uuid NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    old_status text
);

CREATE FUNCTION chaos_log_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chaos_transitions (query_id, old_status, new_status, old_attempts, new_attempts,
                                   old_lease_owner, new_lease_owner, old_lease_expires_at, new_error_code)
    VALUES (NEW.id, OLD.status, NEW.status, OLD.attempts, NEW.attempts,
            OLD.lease_owner, NEW.lease_owner, OLD.lease_expires_at, NEW.error_code);
    RETURN NULL;
END $$;

CREATE FUNCTION chaos_log_terminal_rewrite() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chaos_terminal_rewrites (query_id, old_status, new_status, old_attempts, new_attempts,
                                         old_error_code, new_error_code)
    VALUES (NEW.id, OLD.status, NEW.status, OLD.attempts, NEW.attempts, OLD.error_code, NEW.error_code);
    RETURN NULL;
END $$;

CREATE FUNCTION chaos_log_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chaos_deleted (query_id, old_status) VALUES (OLD.id, OLD.status);
    RETURN NULL;
END $$;

CREATE TRIGGER chaos_transitions AFTER UPDATE ON queries FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.attempts IS DISTINCT FROM NEW.attempts)
    EXECUTE FUNCTION chaos_log_transition();

CREATE TRIGGER chaos_terminal_rewrites AFTER UPDATE ON queries FOR EACH ROW
    WHEN (OLD.status IN ('completed', 'failed', 'cancelled'))
    EXECUTE FUNCTION chaos_log_terminal_rewrite();

CREATE TRIGGER chaos_deleted AFTER DELETE ON queries FOR EACH ROW
    EXECUTE FUNCTION chaos_log_delete();
"""


def connect(url: str, timeout: int = 3) -> Any:
    conn = psycopg2.connect(url, connect_timeout=timeout, application_name="aiq-chaos-harness")
    conn.autocommit = True
    return conn


def install(url: str) -> None:
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(INSTALL_SQL)
    finally:
        conn.close()


@dataclass(frozen=True, slots=True)
class Transition:
    query_id: str
    at: float  # epoch seconds, clock_timestamp() of the change
    txn_at: float  # epoch seconds, start of the writing transaction (the `now()` its WHERE clause saw)
    old_status: str
    new_status: str
    old_attempts: int
    new_attempts: int
    old_lease_owner: str | None
    new_lease_owner: str | None
    old_lease_expires_at: float | None
    new_error_code: str | None

    @property
    def is_reclaim(self) -> bool:
        """Leaving `running` after the lease had run out: the sweeper took the attempt back."""
        return (
            self.old_status == "running"
            and self.old_lease_expires_at is not None
            and self.txn_at > self.old_lease_expires_at
        )


def fetch(url: str) -> dict[str, Any]:
    """Everything the report needs, read once after the drain."""
    conn = connect(url, timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(
                """SELECT id::text, status, attempts, error_code, lease_owner,
                          extract(epoch FROM lease_expires_at), extract(epoch FROM next_attempt_at),
                          extract(epoch FROM updated_at), extract(epoch FROM created_at),
                          extract(epoch FROM finished_at), response IS NOT NULL
                   FROM queries"""
            )
            rows = {
                r[0]: {
                    "status": r[1],
                    "attempts": r[2],
                    "error_code": r[3],
                    "lease_owner": r[4],
                    "lease_expires_at": _f(r[5]),
                    "next_attempt_at": _f(r[6]),
                    "updated_at": _f(r[7]),
                    "created_at": _f(r[8]),
                    "finished_at": _f(r[9]),
                    "has_response": r[10],
                }
                for r in cur.fetchall()
            }
            cur.execute(
                """SELECT query_id::text, extract(epoch FROM at), extract(epoch FROM txn_at), old_status, new_status,
                          old_attempts, new_attempts, old_lease_owner, new_lease_owner,
                          extract(epoch FROM old_lease_expires_at), new_error_code
                   FROM chaos_transitions ORDER BY seq"""
            )
            transitions = [
                Transition(r[0], float(r[1]), float(r[2]), r[3], r[4], r[5], r[6], r[7], r[8], _f(r[9]), r[10])
                for r in cur.fetchall()
            ]
            cur.execute(
                """SELECT query_id::text, extract(epoch FROM at), old_status, new_status, old_attempts, new_attempts,
                          old_error_code, new_error_code, app
                   FROM chaos_terminal_rewrites ORDER BY seq"""
            )
            rewrites = [
                {
                    "query_id": r[0],
                    "at": float(r[1]),
                    "old_status": r[2],
                    "new_status": r[3],
                    "old_attempts": r[4],
                    "new_attempts": r[5],
                    "old_error_code": r[6],
                    "new_error_code": r[7],
                    "app": r[8],
                }
                for r in cur.fetchall()
            ]
            cur.execute("SELECT query_id::text, extract(epoch FROM at), old_status FROM chaos_deleted ORDER BY seq")
            deleted = [{"query_id": r[0], "at": float(r[1]), "old_status": r[2]} for r in cur.fetchall()]
    finally:
        conn.close()
    return {"rows": rows, "transitions": transitions, "rewrites": rewrites, "deleted": deleted}


def _f(value: Any) -> float | None:
    return None if value is None else float(value)
