"""Scrape the running API and worker: the series an operator relies on exist and move."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx

from tests.support.api import wait_terminal
from tests.support.stack import Stack, api_metrics


def _sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def _worker_metrics(stack: Stack) -> str:
    return httpx.get(f"http://127.0.0.1:{stack.env['WORKER_METRICS_PORT']}/metrics").text


def test_api_and_worker_series_move(client: httpx.Client, stack: Stack, user: dict[str, Any]) -> None:
    api_before = api_metrics(stack)
    worker_before = _worker_metrics(stack)

    ok = client.post("/api/v1/query", json={"query": f"count me {uuid.uuid4()}"}, headers=user["headers"])
    failing = client.post("/api/v1/query", json={"query": f"[[sim fail=400]] {uuid.uuid4()}"}, headers=user["headers"])
    flaky = client.post(
        "/api/v1/query",
        json={"query": f"[[sim fail=429 times=1 retry_after=0]] {uuid.uuid4()}"},
        headers=user["headers"],
    )
    for r in (ok, failing, flaky):
        wait_terminal(client, user["headers"], r.json()["query_id"])

    api_after = api_metrics(stack)
    worker_after = _worker_metrics(stack)

    def moved(before: str, after: str, name: str, by: float = 1, **labels: str) -> bool:
        return _sample(after, name, **labels) - _sample(before, name, **labels) >= by

    route = "/api/v1/query"
    assert moved(api_before, api_after, "aiq_http_requests_total", 3, method="POST", route=route, status="202")
    assert moved(api_before, api_after, "aiq_http_request_duration_seconds_count", 3, method="POST", route=route)
    assert moved(api_before, api_after, "aiq_queries_submitted_total", 3, model="sim-small")
    assert 'route="/api/v1/query/{query_id}"' in api_after  # templates, never ids, as labels
    assert user["user_id"] not in api_after
    assert "aiq_oldest_pending_age_seconds" in api_after
    assert 'aiq_queue_depth{queue="' in api_after

    assert moved(worker_before, worker_after, "aiq_tasks_total", 2, outcome="completed")
    assert moved(worker_before, worker_after, "aiq_tasks_total", 1, outcome="failed")
    assert moved(worker_before, worker_after, "aiq_task_retries_total", 1, reason="rate_limit")
    assert moved(worker_before, worker_after, "aiq_llm_errors_total", 1, model="sim-small", type="bad_request")
    assert moved(worker_before, worker_after, "aiq_llm_request_duration_seconds_count", 2, model="sim-small")
    assert moved(worker_before, worker_after, "aiq_llm_tokens_total", 1, model="sim-small", kind="completion")
    assert _sample(worker_after, "aiq_llm_calls_in_flight") == 0


def test_worker_liveness_endpoint(stack: Stack) -> None:
    r = httpx.get(f"http://127.0.0.1:{stack.env['WORKER_METRICS_PORT']}/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
