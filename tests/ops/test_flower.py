"""Flower, as operators run it: behind basic auth, showing each task by query id and no prompt text."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from devkit.procs import free_port, spawn
from tests.support.api import wait_terminal
from tests.support.stack import Stack


def test_flower_lists_tasks_by_query_id_behind_auth(
    client: httpx.Client, stack: Stack, user: dict[str, Any], tmp_path: Path
) -> None:
    port = free_port()
    password = uuid.uuid4().hex
    flower = spawn(
        "flower",
        [
            sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower",
            f"--port={port}", "--address=127.0.0.1", f"--basic-auth=ops:{password}",
        ],
        env=stack.env, log=tmp_path / "flower.log",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthcheck", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "flower did not start"
            time.sleep(0.2)
        assert httpx.get(f"{base}/api/tasks").status_code == 401
        # Flower switches task events on in the workers it sees every few seconds; until then it sees nothing.
        prompt = f"flower-secret-{uuid.uuid4().hex}"
        tasks: dict[str, Any] = {}
        query_id = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            query_id = client.post("/api/v1/query", json={"query": prompt}, headers=user["headers"]).json()["query_id"]
            wait_terminal(client, user["headers"], query_id)
            time.sleep(1)
            tasks = httpx.get(f"{base}/api/tasks", auth=("ops", password), timeout=5).json()
            if any(query_id in str(t.get("args")) for t in tasks.values()):
                break
        ours = [t for t in tasks.values() if query_id in str(t.get("args"))]
        assert ours, f"no task for {query_id} in Flower"
        assert ours[0]["name"] == "queries.process"
        assert prompt not in str(tasks)
    finally:
        flower.stop(15)
