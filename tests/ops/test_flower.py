"""Flower, as operators run it: behind basic auth, one task per query id, its state matching the row, no prompt."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from devkit.procs import free_port, spawn
from shared.queue import Publisher
from tests.support.api import wait_terminal
from tests.support.polling import wait_for_http
from tests.support.stack import Stack

AUTH = ("ops", uuid.uuid4().hex)


class Flower(NamedTuple):
    url: str
    log: Path


@pytest.fixture(scope="module")
def flower_proc(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    """A real Flower on the stack's broker behind basic auth."""
    port = free_port()
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    proc = spawn(
        "flower",
        [
            sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower",
            f"--port={port}", "--address=127.0.0.1", f"--basic-auth={AUTH[0]}:{AUTH[1]}",
        ],
        env=stack.env, log=log,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/healthcheck", proc=proc.popen)
        yield Flower(base, log)
    finally:
        proc.stop(15)


def _submit(client: httpx.Client, user: dict[str, Any], prompt: str) -> str:
    r = client.post("/api/v1/query", json={"query": prompt}, headers=user["headers"])
    assert r.status_code == 202, r.text
    query_id: str = r.json()["query_id"]
    return query_id


def _task(flower: str, task_id: str) -> dict[str, Any] | None:
    """Flower's REST view of one task, or None while Flower has not seen it."""
    r = httpx.get(f"{flower}/api/task/info/{task_id}", auth=AUTH, timeout=5)
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    info: dict[str, Any] = r.json()
    return info


def _settled(flower: str, task_id: str, state: str, timeout: float = 20) -> dict[str, Any]:
    """Wait until Flower shows the task in `state` (events arrive a moment after the row is written)."""
    deadline = time.monotonic() + timeout
    info = None
    while time.monotonic() < deadline:
        info = _task(flower, task_id)
        if info is not None and info["state"] == state:
            return info
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} not {state} in Flower: {info}")


def _events_on(client: httpx.Client, user: dict[str, Any], flower: str) -> None:
    """Flower switches task events on in the workers it sees every few seconds; until then it sees nothing."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        query_id = _submit(client, user, f"warm-up {uuid.uuid4().hex}")
        wait_terminal(client, user["headers"], query_id)
        time.sleep(1)
        if _task(flower, query_id) is not None:
            return
    raise AssertionError("Flower never saw a task")


@pytest.fixture
def flower(flower_proc: Flower) -> str:
    """The Flower's base URL."""
    return flower_proc.url


def test_flower_api_refuses_requests_without_credentials(flower: str) -> None:
    assert httpx.get(f"{flower}/api/tasks", timeout=5).status_code == 401
    assert httpx.get(f"{flower}/api/task/info/{uuid.uuid4()}", timeout=5).status_code == 401


def test_flower_shows_each_query_under_its_id_with_the_rows_outcome(
    client: httpx.Client, stack: Stack, user: dict[str, Any], flower: str, flower_proc: Flower
) -> None:
    _events_on(client, user, flower)
    marker = f"flower-secret-{uuid.uuid4().hex}"
    completed = _submit(client, user, f"{marker} plain")
    retried = _submit(client, user, f"[[sim fail=500 times=1]] {marker} flaky")
    failed = _submit(client, user, f"[[sim fail=401]] {marker} refused")
    rows = {query_id: wait_terminal(client, user["headers"], query_id) for query_id in (completed, retried, failed)}
    assert [rows[q]["status"] for q in (completed, retried, failed)] == ["completed", "completed", "failed"]

    done = _settled(flower, completed, "SUCCESS")
    assert done["name"] == "queries.process"
    assert done["args"] == repr([completed])
    tokens = rows[completed]["usage"]["total_tokens"]
    assert done["result"] == repr(f"completed attempts=1 tokens={tokens}")
    assert done["retries"] == 0
    assert done["retried"] is None

    # The retry is Celery's own: the same task id came back with retries=1, after a RETRY carrying the code.
    again = _settled(flower, retried, "SUCCESS")
    assert again["retries"] == 1
    assert again["retried"] is not None
    assert "AttemptRetried('upstream_error')" in again["exception"]
    assert again["result"] == repr(f"completed attempts=2 tokens={rows[retried]['usage']['total_tokens']}")

    gave_up = _settled(flower, failed, "FAILURE")
    assert gave_up["exception"] == "QueryFailed('upstream_auth_failed')"
    assert rows[failed]["error"]["code"] == "upstream_auth_failed"
    assert gave_up["result"] is None

    # The HTML page an operator opens by pasting the query id.
    page = httpx.get(f"{flower}/task/{failed}", auth=AUTH, timeout=5)
    assert page.status_code == 200
    assert "upstream_auth_failed" in page.text
    assert "FAILURE" in page.text

    everything = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).text
    for query_id in (completed, retried, failed):
        assert query_id in everything
        assert marker not in httpx.get(f"{flower}/task/{query_id}", auth=AUTH, timeout=5).text
    assert marker not in everything
    # Neither the worker's log (Celery's own lines included) nor Flower's carries the prompt.
    assert marker not in stack.read_logs()
    assert marker not in flower_proc.log.read_text(errors="replace")


def test_a_duplicate_delivery_does_not_overwrite_the_outcome_flower_shows(
    client: httpx.Client, stack: Stack, user: dict[str, Any], flower: str
) -> None:
    _events_on(client, user, flower)
    failed = _submit(client, user, f"[[sim fail=404]] {uuid.uuid4().hex}")
    wait_terminal(client, user["headers"], failed)
    _settled(flower, failed, "FAILURE")
    publisher = Publisher(stack.settings)
    try:
        publisher.publish_sync(uuid.UUID(failed))
    finally:
        publisher.close()
    # The duplicate is received and skipped; a later query on the same queue proves it has been handled.
    wait_terminal(client, user["headers"], _submit(client, user, "after the duplicate"))
    time.sleep(1)
    info = _task(flower, failed)
    assert info is not None
    assert info["state"] == "FAILURE"
    assert info["exception"] == "QueryFailed('model_not_found')"
