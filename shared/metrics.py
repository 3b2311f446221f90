"""Prometheus metrics of API and worker.

Names and labels are a contract with `monitoring/` (dashboards, alerts) and are fixed in docs/DESIGN.md:
change them there first. Label values must stay bounded: route templates, never raw paths or ids.

Multiprocess mode: when `PROMETHEUS_MULTIPROC_DIR` is set in the environment *before* `prometheus_client`
is first imported, values live in per-process files and `render_metrics()` aggregates them. The default
deployment (uvicorn single process, Celery threads pool) does not need it; it exists for
`uvicorn --workers N` or a prefork pool.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

log = logging.getLogger(__name__)

MULTIPROC_DIR: str | None = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
if MULTIPROC_DIR:
    # prometheus_client opens its value files as soon as an unlabelled metric is created (below), and
    # fails if the directory is missing, e.g. a fresh emptyDir or tmpfs.
    os.makedirs(MULTIPROC_DIR, exist_ok=True)

# API requests are database round-trips plus an enqueue: milliseconds normally, seconds when degraded.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
# LLM calls run from tens of milliseconds (cached, tiny) to the 60 s timeout and beyond for slow servers.
LLM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0)

HTTP_REQUESTS = Counter(
    "aiq_http_requests_total",
    "HTTP requests handled by the API, by route template and status code.",
    ["method", "route", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "aiq_http_request_duration_seconds",
    "Time from request start to the end of the response body, by route template.",
    ["method", "route"],
    buckets=HTTP_BUCKETS,
)
QUERIES_SUBMITTED = Counter(
    "aiq_queries_submitted_total",
    "Queries accepted (202) by the API.",
    ["model"],
)

RESPONSE_CACHE_LOOKUPS = Counter(
    "aiq_response_cache_lookups_total",
    "Response cache lookups at submit by cache-enabled queries, by result (hit|miss).",
    ["result"],
)

LIMIT_REFUSALS = Counter(
    "aiq_limit_refusals_total",
    "Requests refused with 429 by a limit or throttle "
    "(rate_limited|too_many_pending|token_budget_exceeded|login_throttled|register_throttled).",
    ["limit"],
)
TASKS = Counter(
    "aiq_tasks_total",
    "Task deliveries processed by workers, by outcome (completed|failed|retried|cancelled|skipped|released|lost;"
    " released = handed back at shutdown, lost = the attempt no longer owned the row: its write was discarded).",
    ["outcome"],
)
LLM_REQUEST_DURATION = Histogram(
    "aiq_llm_request_duration_seconds",
    "Duration of chat-completion calls to the upstream LLM.",
    ["model"],
    buckets=LLM_BUCKETS,
)
LLM_TOKENS = Counter(
    "aiq_llm_tokens_total",
    "Tokens reported by the upstream LLM, by kind (prompt|completion).",
    ["model", "kind"],
)
LLM_ERRORS = Counter(
    "aiq_llm_errors_total",
    "Failed upstream LLM calls by error type "
    "(rate_limit|quota|server_error|timeout|connection|bad_request|auth|not_found|other).",
    ["model", "type"],
)
TASK_RETRIES = Counter(
    "aiq_task_retries_total",
    "Attempts sent back to pending for a retry, by reason.",
    ["reason"],
)
LLM_CALLS_IN_FLIGHT = Gauge(
    "aiq_llm_calls_in_flight",
    "Upstream LLM calls currently awaiting a response.",
    # Sum over live processes; the default multiprocess mode would add a `pid` label.
    multiprocess_mode="livesum",
)
# Webhook delivery lag runs from the query's end to the receiver's 2xx: sub-second normally, hours when the
# receiver was down and retries took over.
WEBHOOK_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0, 36000.0, 86400.0)
WEBHOOK_DELIVERIES = Counter(
    "aiq_webhook_deliveries_total",
    "Webhook delivery attempts by outcome (delivered|retried|failed|gone|skipped; failed = given up after the"
    " last retry, gone = 410 from the receiver, which disables the account's endpoint).",
    ["outcome"],
)
WEBHOOK_DELIVERY_LAG = Histogram(
    "aiq_webhook_delivery_lag_seconds",
    "From a query's end (its outbox row) to the receiver's 2xx, retries included.",
    buckets=WEBHOOK_LAG_BUCKETS,
)

# Streams (issue 12): open SSE streams on the API, events appended to query logs (worker and API), and the
# time from the start of an upstream call to its first streamed token.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
SSE_STREAMS_OPEN = Gauge(
    "aiq_sse_streams_open",
    "Server-Sent Event streams of query events currently open on the API.",
    multiprocess_mode="livesum",
)
EVENTS_PUBLISHED = Counter(
    "aiq_events_published_total",
    "Events appended to query event logs, by type (queued|started|delta|attempt_restarted|retry_scheduled|"
    "completed|failed|cancelled).",
    ["type"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "aiq_time_to_first_token_seconds",
    "Time from the start of a streamed upstream call to its first content delta.",
    ["model"],
    buckets=TTFT_BUCKETS,
)

QUEUE_DEPTH = "aiq_queue_depth"
OLDEST_PENDING_AGE = "aiq_oldest_pending_age_seconds"
QUERIES_BY_STATUS = "aiq_queries"
# Live statuses are always exported (0 when the source omits them, as a GROUP BY does for empty groups), so
# dashboards and alerts see a series instead of a gap. Other statuses appear only if the source reports them.
ZERO_FILLED_STATUSES = ("pending", "running")

# Collectors that must also be exposed in multiprocess mode, where the default registry is not used.
_extra_collectors: list[Collector] = []
_extra_lock = threading.Lock()


def _registry() -> CollectorRegistry:
    if not MULTIPROC_DIR:
        return REGISTRY
    # A fresh registry per scrape is prometheus_client's documented multiprocess pattern.
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=MULTIPROC_DIR)  # type: ignore[no-untyped-call]
    with _extra_lock:
        for collector in _extra_collectors:
            registry.register(collector)
    return registry


def render_metrics() -> tuple[bytes, str]:
    """The exposition body and its content type, for an HTTP `/metrics` handler."""
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


DepthFn = Callable[[], float | Mapping[str, float]]
AgeFn = Callable[[], float | None]
StatusCountsFn = Callable[[], Mapping[str, float]]


@dataclass
class QueueStats:
    """The API's last reading of the queue, refreshed at each scrape and read by the `QueueCollector`."""

    depth: int = 0
    oldest_pending_age: float | None = None
    counts: dict[str, int] = field(default_factory=dict)


class QueueCollector(Collector):
    """Reads queue state at scrape time; each source is guarded so a scrape never fails.

    A source that raises is left out of that scrape (its series goes stale) and logged; the
    other sources are still exported.
    """

    def __init__(
        self,
        depth_fn: DepthFn,
        oldest_pending_age_fn: AgeFn,
        status_counts_fn: StatusCountsFn,
        *,
        queue: str,
    ) -> None:
        self._depth_fn = depth_fn
        self._age_fn = oldest_pending_age_fn
        self._counts_fn = status_counts_fn
        self._queue = queue

    def describe(self) -> Iterable[Metric]:
        # Without describe() the registry would call collect() (and hit Redis/PostgreSQL) at registration.
        return [
            GaugeMetricFamily(QUEUE_DEPTH, "", labels=["queue"]),
            GaugeMetricFamily(OLDEST_PENDING_AGE, ""),
            GaugeMetricFamily(QUERIES_BY_STATUS, "", labels=["status"]),
        ]

    def collect(self) -> Iterator[Metric]:
        ok, depth = _guarded(QUEUE_DEPTH, self._depth_fn)
        if ok:
            family = GaugeMetricFamily(
                QUEUE_DEPTH, "Messages waiting in the broker queue (not yet reserved by a worker).", labels=["queue"]
            )
            values = depth if isinstance(depth, Mapping) else {self._queue: depth}
            for queue, value in values.items():
                family.add_metric([str(queue)], float(value))
            yield family

        ok, age = _guarded(OLDEST_PENDING_AGE, self._age_fn)
        if ok:
            yield GaugeMetricFamily(
                OLDEST_PENDING_AGE,
                "Age of the oldest pending query in seconds; 0 when nothing is pending.",
                value=float(age or 0.0),
            )

        ok, counts = _guarded(QUERIES_BY_STATUS, self._counts_fn)
        if ok:
            family = GaugeMetricFamily(QUERIES_BY_STATUS, "Queries stored, by status.", labels=["status"])
            merged: dict[str, float] = dict.fromkeys(ZERO_FILLED_STATUSES, 0.0)
            merged.update({str(k): float(v) for k, v in counts.items()})
            for status, value in merged.items():
                family.add_metric([status], value)
            yield family


def _guarded(name: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, fn()
    except Exception as exc:  # noqa: BLE001 - a scrape must survive a dead database or broker
        log.warning("metrics source failed", extra={"kind": name, "error": type(exc).__name__})
        return False, None


def register_queue_collector(
    depth_fn: DepthFn,
    oldest_pending_age_fn: AgeFn,
    status_counts_fn: StatusCountsFn,
    *,
    queue: str,
) -> QueueCollector:
    """Export `aiq_queue_depth{queue}`, `aiq_oldest_pending_age_seconds` and `aiq_queries{status}`.

    The callables are plain (synchronous) and run in the scrape's thread: give them short timeouts.
    `depth_fn` returns the depth of `queue`, or a mapping queue name -> depth. `oldest_pending_age_fn`
    returns seconds or None (nothing pending). `status_counts_fn` returns status -> count; pending and
    running are exported as 0 when missing, other statuses only when present.
    Returns the collector so it can be passed to `unregister_collector()`.
    """
    collector = QueueCollector(depth_fn, oldest_pending_age_fn, status_counts_fn, queue=queue)
    if MULTIPROC_DIR:
        with _extra_lock:
            _extra_collectors.append(collector)
    else:
        REGISTRY.register(collector)
    return collector


def unregister_collector(collector: Collector) -> None:
    """Undo `register_queue_collector()` (app shutdown, tests)."""
    if MULTIPROC_DIR:
        with _extra_lock:
            if collector in _extra_collectors:
                _extra_collectors.remove(collector)
        return
    with contextlib.suppress(KeyError):
        REGISTRY.unregister(collector)


HealthFn = Callable[[], bool]
_HEALTHY = b'{"status":"ok"}'
_UNHEALTHY = b'{"status":"unhealthy"}'


def _worker_app(health_fn: HealthFn | None) -> Callable[[WSGIEnvironment, StartResponse], list[bytes]]:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            healthy = True
            if health_fn is not None:
                try:
                    healthy = bool(health_fn())
                except Exception:  # noqa: BLE001 - a raising check means unhealthy, not a crashed server
                    healthy = False
            status, body = ("200 OK", _HEALTHY) if healthy else ("503 Service Unavailable", _UNHEALTHY)
            start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if path in ("/metrics", "/"):
            output, content_type = render_metrics()
            start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(output)))])
            return [output]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    # A slow scraper must not block the liveness probe, and no request thread may delay process exit.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # Probes and scrapes every few seconds would drown the JSON logs in plain-text access lines.
        pass


def start_worker_metrics_server(port: int, addr: str = "0.0.0.0", health_fn: HealthFn | None = None) -> WSGIServer:
    """Serve `/metrics` and `/healthz` on a daemon thread; returns the server (`.shutdown()` stops it).

    `/healthz` answers 200 `{"status":"ok"}`, or 503 when `health_fn` returns False or raises.
    Port 0 picks a free port (see `server.server_port`).
    """
    server = make_server(addr, port, _worker_app(health_fn), _ThreadingWSGIServer, _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="aiq-metrics", daemon=True)
    thread.start()
    return server
