"""shared/metrics.py and api/middleware.py against the metric contract in docs/DESIGN.md."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from api.middleware import (
    LONG_REQUEST_SCOPE_KEY,
    UNMATCHED_ROUTE,
    EdgeMiddleware,
    mark_long_request,
    request_id_var,
)
from shared import metrics
from shared.logging import JsonFormatter

ROOT = Path(__file__).resolve().parents[2]
HEX32 = re.compile(r"[0-9a-f]{32}")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def design_metrics() -> dict[str, set[str]]:
    """`name{label,...}` pairs of the Metrics section of docs/DESIGN.md."""
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    found: dict[str, set[str]] = {}
    for name, labels in re.findall(r"`(aiq_[a-z_]+)(?:\{([a-z_,]+)\})?`", section):
        found[name] = set(labels.split(",")) if labels else set()
    return found


def module_metrics() -> dict[str, MetricWrapperBase]:
    return {m._name: m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}


def exposed_name(metric: MetricWrapperBase) -> str:
    # prometheus_client strips `_total` from a counter's name and adds it back on exposition.
    name = str(metric._name)
    return name + "_total" if isinstance(metric, Counter) else name


def test_metric_objects_match_design_contract() -> None:
    design = design_metrics()
    assert len(design) >= 12, "the Metrics section of DESIGN.md could not be parsed"
    objects = {exposed_name(m): m for m in module_metrics().values()}
    collector_names = {
        metrics.QUEUE_DEPTH,
        metrics.OLDEST_PENDING_AGE,
        metrics.QUERIES_BY_STATUS,
        metrics.USERS_WAITING,
    }
    assert set(objects) | collector_names == set(design)
    for name, metric in objects.items():
        assert set(metric._labelnames) == design[name], name
    assert design[metrics.QUEUE_DEPTH] == {"queue"}
    assert design[metrics.QUERIES_BY_STATUS] == {"status"}
    assert design[metrics.OLDEST_PENDING_AGE] == set()


def test_metric_types_and_buckets() -> None:
    assert isinstance(metrics.HTTP_REQUEST_DURATION, Histogram)
    assert isinstance(metrics.LLM_REQUEST_DURATION, Histogram)
    assert isinstance(metrics.LLM_CALLS_IN_FLIGHT, Gauge)
    assert (metrics.HTTP_BUCKETS[0], metrics.HTTP_BUCKETS[-1]) == (0.005, 5.0)
    assert (metrics.LLM_BUCKETS[0], metrics.LLM_BUCKETS[-1]) == (0.05, 120.0)
    for buckets in (metrics.HTTP_BUCKETS, metrics.LLM_BUCKETS):
        assert list(buckets) == sorted(set(buckets))
    # The LLM timeout (60 s) must fall on a bucket edge so "timed out" is distinguishable.
    assert 60.0 in metrics.LLM_BUCKETS


async def query_endpoint(request: Request) -> JSONResponse:
    return JSONResponse({"id": request.path_params["query_id"], "rid": request_id_var.get()})


def sync_endpoint(request: Request) -> JSONResponse:
    # Sync endpoints run in a worker thread: the context variable must have been copied there.
    return JSONResponse({"rid": request_id_var.get(), "state": request.state.request_id})


async def boom(request: Request) -> PlainTextResponse:
    raise RuntimeError("boom")


async def long_poll(request: Request) -> PlainTextResponse:
    mark_long_request(request.scope)
    return PlainTextResponse("waited")


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = Starlette(
        routes=[
            Route("/api/v1/query/{query_id}", query_endpoint),
            Route("/sync", sync_endpoint),
            Route("/boom", boom),
            Route("/wait", long_poll),
        ]
    )
    app.add_middleware(EdgeMiddleware, max_bytes=64 * 1024)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_route_template_label(client: TestClient) -> None:
    route = "/api/v1/query/{query_id}"
    before = sample("aiq_http_requests_total", method="GET", route=route, status="200")
    count_before = sample("aiq_http_request_duration_seconds_count", method="GET", route=route)
    for i in range(3):
        assert client.get(f"/api/v1/query/q{i}").status_code == 200
    assert sample("aiq_http_requests_total", method="GET", route=route, status="200") == before + 3
    assert sample("aiq_http_request_duration_seconds_count", method="GET", route=route) == count_before + 3
    assert sample("aiq_http_requests_total", method="GET", route="/api/v1/query/q1", status="200") == 0


def test_405_keeps_the_route_template(client: TestClient) -> None:
    route = "/api/v1/query/{query_id}"
    before = sample("aiq_http_requests_total", method="DELETE", route=route, status="405")
    assert client.delete("/api/v1/query/abc").status_code == 405
    assert sample("aiq_http_requests_total", method="DELETE", route=route, status="405") == before + 1


def test_unmatched_paths_and_methods_share_bounded_labels(client: TestClient) -> None:
    before = sample("aiq_http_requests_total", method="GET", route=UNMATCHED_ROUTE, status="404")
    for i in range(25):
        assert client.get(f"/scanner/{i}/wp-admin.php").status_code == 404
    assert sample("aiq_http_requests_total", method="GET", route=UNMATCHED_ROUTE, status="404") == before + 25

    assert client.request("PROPFIND", "/nowhere").status_code == 404
    assert sample("aiq_http_requests_total", method="OTHER", route=UNMATCHED_ROUTE, status="404") >= 1

    routes = {
        s.labels["route"] for family in REGISTRY.collect() if family.name == "aiq_http_requests" for s in family.samples
    }
    assert not any("scanner" in r or "/q1" in r for r in routes), routes


def test_unhandled_exception_counts_as_500(client: TestClient) -> None:
    before = sample("aiq_http_requests_total", method="GET", route="/boom", status="500")
    assert client.get("/boom").status_code == 500
    assert sample("aiq_http_requests_total", method="GET", route="/boom", status="500") == before + 1


def _gone_client(app: Any, scope_path: str, *, send_raises: bool) -> list[dict[str, Any]]:
    """Drive `app` as a server whose client has hung up: `receive` says so; `send` raises (ASGI 2.4) or drops."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if send_raises:
            raise OSError("client gone")
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": scope_path, "headers": [], "query_string": b""}
    with contextlib.suppress(OSError):
        asyncio.run(app(scope, receive, send))
    return sent


def test_a_client_gone_before_its_answer_counts_as_499_not_500() -> None:
    async def stream(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"late"

        return StreamingResponse(body())

    async def gives_up(scope: Any, receive: Any, send: Any) -> None:
        # An app that hears the disconnect first and answers nothing.
        assert (await receive())["type"] == "http.disconnect"

    def count(route: str, status: str) -> float:
        return sample("aiq_http_requests_total", method="GET", route=route, status=status)

    app = Starlette(routes=[Route("/gone", stream), Mount("/quiet", app=gives_up)])
    app.add_middleware(EdgeMiddleware, max_bytes=64 * 1024)

    def total(status: str) -> float:
        return sum(
            m.value
            for family in REGISTRY.collect()
            if family.name == "aiq_http_requests"
            for m in family.samples
            if m.name == "aiq_http_requests_total" and m.labels.get("status") == status
        )

    before_gone, before_499, before_500 = count("/gone", "499"), total("499"), total("500")
    # A server whose `send` raises once the client is gone (ASGI 2.4): the response never starts.
    _gone_client(app, "/gone", send_raises=True)
    assert count("/gone", "499") == before_gone + 1
    assert _gone_client(app, "/quiet/x", send_raises=False) == []
    assert total("499") == before_499 + 2
    assert total("500") == before_500


def test_a_500_carries_the_request_id_in_its_header_and_its_log_line(client: TestClient) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("aiq-api"))
    errors_log = logging.getLogger("api.errors")
    errors_log.addHandler(handler)
    try:
        r = client.get("/boom", headers={"X-Request-ID": "trace-500-abc"})
    finally:
        errors_log.removeHandler(handler)
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal_error", "message": "Internal server error"}}
    assert r.headers["x-request-id"] == "trace-500-abc"
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["msg"], e.get("request_id"), e.get("exc_type")) for e in lines] == [
        ("unhandled error", "trace-500-abc", "RuntimeError")
    ]


def test_long_requests_are_counted_but_not_timed(client: TestClient) -> None:
    assert LONG_REQUEST_SCOPE_KEY == "aiq.long_request"
    before = sample("aiq_http_requests_total", method="GET", route="/wait", status="200")
    assert client.get("/wait").status_code == 200
    assert sample("aiq_http_requests_total", method="GET", route="/wait", status="200") == before + 1
    assert sample("aiq_http_request_duration_seconds_count", method="GET", route="/wait") == 0


def test_fastapi_nested_routers_give_full_templates() -> None:
    """The API's shape: routers with prefixes included into routers, plus FastAPI's own doc routes."""
    app = FastAPI()
    v1 = APIRouter(prefix="/api/v1")
    queries = APIRouter(prefix="/query")

    @queries.get("/{query_id}")
    async def get_query(query_id: uuid.UUID) -> dict[str, str]:
        return {}

    @queries.post("")
    async def submit() -> dict[str, str]:
        return {}

    @queries.get("/{query_id}/wait")
    async def wait(query_id: str, request: Request) -> dict[str, str]:
        mark_long_request(request.scope)
        return {}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {}

    v1.include_router(queries)
    app.include_router(v1)
    app.add_middleware(EdgeMiddleware, max_bytes=64 * 1024)
    client = TestClient(app)
    cases = [
        ("GET", f"/api/v1/query/{uuid.uuid4()}", "/api/v1/query/{query_id}", "200"),
        ("GET", "/api/v1/query/not-a-uuid", "/api/v1/query/{query_id}", "422"),
        ("POST", "/api/v1/query", "/api/v1/query", "200"),
        ("DELETE", "/api/v1/query", "/api/v1/query", "405"),
        ("GET", "/healthz", "/healthz", "200"),
        ("GET", "/docs", "/docs", "200"),
        ("GET", "/openapi.json", "/openapi.json", "200"),
        ("GET", "/api/v1/nothing", UNMATCHED_ROUTE, "404"),
    ]
    for method, path, route, status in cases:
        before = sample("aiq_http_requests_total", method=method, route=route, status=status)
        assert str(client.request(method, path).status_code) == status, path
        assert sample("aiq_http_requests_total", method=method, route=route, status=status) == before + 1, path
    # The flag set through FastAPI's Request reaches the middleware (same scope dict).
    assert client.get("/api/v1/query/abc/wait").status_code == 200
    assert sample("aiq_http_requests_total", method="GET", route="/api/v1/query/{query_id}/wait", status="200") == 1
    assert sample("aiq_http_request_duration_seconds_count", method="GET", route="/api/v1/query/{query_id}/wait") == 0


def test_request_id_is_adopted_echoed_and_visible_to_handlers(client: TestClient) -> None:
    rid = "abc-123_DEF.456"
    r = client.get("/api/v1/query/x", headers={"X-Request-ID": rid})
    assert r.headers["x-request-id"] == rid
    assert r.json()["rid"] == rid
    r = client.get("/sync", headers={"X-Request-ID": rid})
    assert r.json() == {"rid": rid, "state": rid}
    # The variable is reset after the request: nothing leaks into unrelated work.
    assert request_id_var.get() is None


@pytest.mark.parametrize(
    "bad",
    ["a" * 65, "has space", "semi;colon", "new\\nline", "<script>", "ünïcode"],
)
def test_invalid_request_id_is_replaced(client: TestClient, bad: str) -> None:
    r = client.get("/api/v1/query/x", headers=[(b"X-Request-ID", bad.encode("utf-8"))])
    rid = r.headers["x-request-id"]
    assert HEX32.fullmatch(rid), rid
    assert r.json()["rid"] == rid


def test_request_id_generated_when_missing_and_on_errors(client: TestClient) -> None:
    first = client.get("/api/v1/query/x").headers["x-request-id"]
    second = client.get("/api/v1/query/x").headers["x-request-id"]
    assert HEX32.fullmatch(first)
    assert HEX32.fullmatch(second)
    assert first != second
    assert HEX32.fullmatch(client.get("/nothing-here").headers["x-request-id"])
    # Exactly one header, even if a handler had set its own.
    assert len(client.get("/api/v1/query/x").headers.get_list("x-request-id")) == 1


def test_request_id_max_length_is_accepted(client: TestClient) -> None:
    rid = "x" * 64
    assert client.get("/sync", headers={"X-Request-ID": rid}).headers["x-request-id"] == rid


@pytest.fixture
def collectors() -> Iterator[list[metrics.QueueCollector]]:
    registered: list[metrics.QueueCollector] = []
    yield registered
    for c in registered:
        metrics.unregister_collector(c)


def raise_error() -> float:
    raise ConnectionError("database is down")


def test_queue_collector_exports_at_scrape_time(collectors: list[metrics.QueueCollector]) -> None:
    depth = {"value": 7}
    collectors.append(
        metrics.register_queue_collector(
            lambda: depth["value"], lambda: 42.5, lambda: {"pending": 3, "completed": 10}, queue="aiq.queries"
        )
    )
    assert sample("aiq_queue_depth", queue="aiq.queries") == 7
    depth["value"] = 9
    assert sample("aiq_queue_depth", queue="aiq.queries") == 9
    assert sample("aiq_oldest_pending_age_seconds") == 42.5
    assert sample("aiq_queries", status="pending") == 3
    assert sample("aiq_queries", status="completed") == 10
    # Live statuses with no rows are exported as 0 rather than missing; others only when reported.
    assert REGISTRY.get_sample_value("aiq_queries", {"status": "running"}) == 0
    assert REGISTRY.get_sample_value("aiq_queries", {"status": "cancelled"}) is None


def test_queue_collector_accepts_mapping_and_none(collectors: list[metrics.QueueCollector]) -> None:
    collectors.append(
        metrics.register_queue_collector(lambda: {"a": 1, "b": 2}, lambda: None, dict, queue="aiq.queries")
    )
    assert sample("aiq_queue_depth", queue="a") == 1
    assert sample("aiq_queue_depth", queue="b") == 2
    assert REGISTRY.get_sample_value("aiq_oldest_pending_age_seconds") == 0


@pytest.mark.parametrize("broken", ["depth", "age", "counts"])
def test_queue_collector_survives_a_raising_source(
    collectors: list[metrics.QueueCollector], broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    collectors.append(
        metrics.register_queue_collector(
            raise_error if broken == "depth" else (lambda: 5),
            raise_error if broken == "age" else (lambda: 1.0),
            raise_error if broken == "counts" else (lambda: {"running": 2}),  # type: ignore[arg-type]
            queue="aiq.queries",
        )
    )
    body, content_type = metrics.render_metrics()
    text = body.decode()
    assert content_type.startswith("text/plain")
    assert "aiq_http_requests_total" in text or "aiq_http_requests" in text
    assert ("aiq_queue_depth{" in text) is (broken != "depth")
    assert ("\naiq_oldest_pending_age_seconds " in text) is (broken != "age")
    assert ('aiq_queries{status="running"}' in text) is (broken != "counts")
    assert any(r.message == "metrics source failed" for r in caplog.records)


def test_render_metrics_exposes_design_names() -> None:
    metrics.TASKS.labels("completed").inc(0)
    body, content_type = metrics.render_metrics()
    assert "version=" in content_type
    assert b"# TYPE aiq_tasks_total counter" in body
    assert b"aiq_llm_calls_in_flight" in body


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - fixed http:// URL of the test server
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_worker_metrics_server_serves_metrics_and_healthz() -> None:
    server = metrics.start_worker_metrics_server(0, addr="127.0.0.1")
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        status, body = get(base + "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        status, body = get(base + "/metrics")
        assert status == 200
        assert b"aiq_llm_calls_in_flight" in body
        assert get(base + "/elsewhere")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("health", [lambda: False, raise_error])
def test_worker_healthz_reports_unhealthy(health: object) -> None:
    server = metrics.start_worker_metrics_server(0, addr="127.0.0.1", health_fn=health)  # type: ignore[arg-type]
    try:
        status, body = get(f"http://127.0.0.1:{server.server_port}/healthz")
        assert (status, json.loads(body)) == (503, {"status": "unhealthy"})
    finally:
        server.shutdown()
        server.server_close()


def test_multiprocess_mode_aggregates_processes(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set, values of child processes and the queue collector both show."""
    mp_dir = tmp_path / "mp" / "nested"  # missing on purpose: metrics.py must create it
    script = textwrap.dedent(
        """
        import multiprocessing as mp
        from shared import metrics
        from tests.support.metrics import mark_process_dead, reset_multiproc_dir

        def child():
            metrics.TASKS.labels("completed").inc(2)
            metrics.LLM_CALLS_IN_FLIGHT.inc()

        reset_multiproc_dir()
        p = mp.get_context("fork").Process(target=child)
        p.start(); p.join()
        metrics.TASKS.labels("completed").inc()
        metrics.register_queue_collector(lambda: 4, lambda: 1.5, lambda: {}, queue="aiq.queries")
        body, _ = metrics.render_metrics()
        text = body.decode()
        assert 'aiq_tasks_total{outcome="completed"} 3.0' in text, text
        assert "aiq_llm_calls_in_flight 1.0" in text, text
        mark_process_dead(p.pid)
        text = metrics.render_metrics()[0].decode()
        assert "aiq_llm_calls_in_flight 0.0" in text, text
        assert 'aiq_queue_depth{queue="aiq.queries"} 4.0' in text, text
        print("ok")
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
