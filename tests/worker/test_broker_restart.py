"""A Redis restart without persistence: the worker reconnects and carries on, nothing is lost."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import Engine

from bench.chaos.services import OwnRedis
from shared.queue import Publisher
from tests.support.api import wait_terminal
from tests.support.db import insert_query, row
from tests.support.polling import wait_until
from tests.support.stack import Stack, spawn_worker


def _publish(stack: Stack, redis_url: str, queue: str, query_id: str) -> None:
    publisher = Publisher(
        stack.settings.model_copy(update={"redis_url": redis_url, "broker_url": redis_url, "queue_name": queue})
    )
    try:
        publisher.publish_sync(uuid.UUID(query_id))
    finally:
        publisher.close()


def test_worker_survives_a_redis_restart_mid_call(
    client: httpx.Client, stack: Stack, user: dict[str, Any], db: Engine, tmp_path: Path
) -> None:
    own = OwnRedis(tmp_path)
    own.start()
    queue = f"aiq.restart.{uuid.uuid4().hex[:6]}"
    worker, _ = spawn_worker(stack, tmp_path / "worker.log", REDIS_URL=own.url, QUEUE_NAME=queue)
    try:
        during = insert_query(db, user["user_id"], f"[[sim latency_ms=2000]] across the restart {uuid.uuid4()}")
        _publish(stack, own.url, queue, during)
        wait_until(lambda: row(db, during)["status"] == "running", timeout=20)
        own.shutdown_nosave()
        time.sleep(1)
        own.start()
        # The call in flight finishes and is recorded even though its message died with Redis.
        assert wait_terminal(client, user["headers"], during)["status"] == "completed"
        time.sleep(3)
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        after = insert_query(db, user["user_id"], f"after the restart {uuid.uuid4()}")
        _publish(stack, own.url, queue, after)
        assert wait_terminal(client, user["headers"], after, timeout=30)["status"] == "completed"
        assert worker.poll() is None
    finally:
        worker.terminate()
        worker.wait(30)
        own.close()
