"""RabbitMQ as the broker: readiness, the quorum queue, publisher confirms and what happens without them."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import Engine

from tests.support.amqp import declare_amqp_queue, delete_amqp_queues, queue_depth, queue_type_is
from tests.support.api import register_and_login, wait_terminal
from tests.support.db import row
from tests.support.stack import Stack, api_metrics, spawn_api, stop


def test_readyz_checks_rabbitmq_and_redis(amqp_stack: Stack) -> None:
    r = httpx.get(f"{amqp_stack.api_url}/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "broker": "ok", "redis": "ok"}


def test_the_queue_is_a_durable_quorum_queue_and_its_depth_is_exported(amqp_stack: Stack, amqp_url: str) -> None:
    queue = amqp_stack.settings.queue_name
    # RabbitMQ refuses to re-declare a queue with another type: that is how a client can read the type.
    assert queue_type_is(amqp_url, queue, "quorum")
    assert not queue_type_is(amqp_url, queue, "classic")
    assert f'aiq_queue_depth{{queue="{queue}"}}' in api_metrics(amqp_stack)


def _submit_through(api_url: str, user: dict[str, Any], prompt: str) -> tuple[str, float]:
    with httpx.Client(base_url=api_url, timeout=10) as c:
        started = time.monotonic()
        r = c.post("/api/v1/query", json={"query": prompt}, headers=user["headers"])
        took = time.monotonic() - started
    assert r.status_code == 202, r.text
    return str(r.json()["query_id"]), took


def test_a_nacked_publish_leaves_the_row_pending_and_the_sweeper_sends_it(
    amqp_stack: Stack, amqp_url: str, amqp_db: Engine, tmp_path: Path
) -> None:
    """RabbitMQ refuses the message (a full queue that rejects publishes): 202, the row waits, the sweeper sends it.

    A second API process publishes to a queue shaped to nack every message (`x-max-length: 0`,
    `x-overflow: reject-publish`); the RabbitMQ stack's worker sweeps the same database and sends the pending
    row to its own queue.
    """
    refusing = f"aiq.test.nack.{uuid.uuid4().hex[:8]}"
    declare_amqp_queue(amqp_url, refusing, **{"x-max-length": 0, "x-overflow": "reject-publish"})
    api, url = spawn_api(amqp_stack, tmp_path / "api-nack.log", QUEUE_NAME=refusing)
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            user = register_and_login(c)
        query_id, took = _submit_through(url, user, f"refused by the broker {uuid.uuid4()}")
        assert row(amqp_db, query_id)["status"] == "pending"
    finally:
        stop(api, 10)
        delete_amqp_queues(amqp_url, refusing)
    assert took < 2.0, took
    log = (tmp_path / "api-nack.log").read_text()
    assert "publish failed; query stays pending" in log
    assert "DeliveryError" in log
    with httpx.Client(base_url=amqp_stack.api_url, timeout=10) as c:
        body = wait_terminal(c, user["headers"], query_id, timeout=40)
    assert body["status"] == "completed"
    assert body["attempts"] == 1


def test_the_api_declares_a_queue_no_worker_has_declared_yet(
    amqp_stack: Stack, amqp_url: str, amqp_db: Engine, tmp_path: Path
) -> None:
    """API before workers (a first deploy): the message is not dropped; the queue is made as Celery makes it."""
    fresh = f"aiq.test.fresh.{uuid.uuid4().hex[:8]}"
    api, url = spawn_api(amqp_stack, tmp_path / "api-fresh.log", QUEUE_NAME=fresh)
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            user = register_and_login(c)
        query_id, _ = _submit_through(url, user, f"first of all {uuid.uuid4()}")
        assert "publish failed" not in (tmp_path / "api-fresh.log").read_text()
        assert queue_depth(amqp_url, fresh) == 1
        assert queue_type_is(amqp_url, fresh, "quorum")
    finally:
        stop(api, 10)
        delete_amqp_queues(amqp_url, fresh)
    assert row(amqp_db, query_id)["status"] == "pending"


def test_readyz_is_503_when_rabbitmq_is_unreachable(amqp_stack: Stack, tmp_path: Path) -> None:
    from devkit.procs import free_port

    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    api, url = spawn_api(amqp_stack, tmp_path / "api-dead-amqp.log", BROKER_URL=dead)
    try:
        r = httpx.get(f"{url}/readyz", timeout=10)
    finally:
        stop(api, 10)
    assert r.status_code == 503
    assert r.json()["checks"] == {"database": "ok", "broker": "down", "redis": "ok"}
