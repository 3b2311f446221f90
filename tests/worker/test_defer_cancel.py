"""A claim given back to wait for the upstream budget, when a cancel came in meanwhile: the row ends
cancelled by that write, so the worker must tell its end as any other terminal write does."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from shared.events import EventType
from shared.limits import Limits
from shared.queue import make_celery
from shared.repositories import queries_asyncpg as repo
from shared.upstream import Refusal
from tests.support.db import insert_query
from tests.support.limits import key_prefix, limits_redis
from tests.support.stack import Stack
from worker import processing
from worker.runtime import WorkerRuntime


@pytest.fixture
def runtime(stack: Stack) -> Iterator[WorkerRuntime]:
    rt = WorkerRuntime(stack.settings, make_celery(stack.settings), loops=[])
    try:
        yield rt
    finally:
        rt.close()


def test_a_deferral_that_finds_a_cancel_settles_and_tells_the_end(
    stack: Stack, runtime: WorkerRuntime, user: dict[str, Any], db: Engine
) -> None:
    user_id = uuid.UUID(user["user_id"])
    query_id = uuid.UUID(
        insert_query(
            db,
            user["user_id"],
            status="'running'",
            attempts="1",
            reserved_tokens="50",
            lease_owner="'someone'",
            lease_expires_at="now() + interval '1 minute'",
            cancel_requested_at="now()",
        )
    )
    # The reservation the submit took for it.
    runtime.run(runtime.limiter.take_submit(user_id, query_id, Limits(0, 0, 10_000, 3600), 50))
    reservation = f"{key_prefix(stack.settings.queue_name)}res:{query_id}"
    assert limits_redis(stack).exists(reservation)
    claim = repo.Claim(query_id, 1, "stored directly", None, "sim-small", None, None)

    outcome = runtime.run(processing.defer(runtime, claim, Refusal(5.0, "requests")))

    with db.connect() as conn:
        status = conn.execute(text("SELECT status FROM queries WHERE id = :q"), {"q": str(query_id)}).scalar()
    assert status == "cancelled"
    assert outcome.kind == processing.OutcomeKind.CANCELLED
    assert not limits_redis(stack).exists(reservation)
    events = runtime.run(runtime.events.since(query_id, 0))
    assert [e.type for e in events] == [EventType.CANCELLED]
