"""The Celery app: `celery -A worker.celery_app worker` starts a correctly configured worker."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from celery.signals import setup_logging, worker_init, worker_process_init, worker_shutdown, worker_shutting_down

from shared.config import get_settings
from shared.logging import configure_logging, query_id_var
from shared.metrics import start_worker_metrics_server
from shared.queue import PROCESS_TASK, make_celery
from worker import processing, recovery
from worker.broker import guard_dead_channel
from worker.runtime import BackgroundLoop, StopReason, WorkerRuntime, current_runtime, get_runtime, shutdown_runtime

settings = get_settings()
app = make_celery(settings)
guard_dead_channel()
log = logging.getLogger("worker")
# What every worker runs beside its tasks: lease renewal with cancel detection, and the recovery sweeper.
BACKGROUND_LOOPS: tuple[BackgroundLoop, ...] = (
    (recovery.heartbeat_loop, recovery.sweep_loop)
    if settings.sweep_interval_seconds > 0
    else (recovery.heartbeat_loop,)
)

# ETA messages live in worker memory and come back after the visibility timeout: keep them well inside it.
MAX_ETA_SECONDS = app.conf.broker_transport_options["visibility_timeout"] / 2


@setup_logging.connect
def _logging(**_: Any) -> None:
    # Connecting this signal stops Celery from installing its own plain-text handlers.
    configure_logging("aiq-worker", settings.log_level)
    if settings.log_level.upper() != "DEBUG":
        # Two lines per task at thousands of tasks a second; AIQ's own line per outcome carries the query id.
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)


def runtime() -> WorkerRuntime:
    """This process's runtime, started with the background loops on first use."""
    return get_runtime(settings, app, BACKGROUND_LOOPS)


@worker_process_init.connect
def _start_child(**_: Any) -> None:
    runtime()


@worker_init.connect
def _start(**_: Any) -> None:
    # Before the broker connection: heartbeat and sweeper must run even while Redis is unreachable.
    rt = runtime()
    # Liveness means the loop that runs every call still answers, not merely that the process exists.
    start_worker_metrics_server(settings.worker_metrics_port, health_fn=lambda: rt.run(_alive(), timeout=5))


async def _alive() -> bool:
    return True


@worker_shutting_down.connect
def _grace(**_: Any) -> None:
    """Warm shutdown: intake has stopped; calls in flight get a grace period, then are handed back."""
    rt = current_runtime()
    if rt is None:
        return
    timer = threading.Timer(settings.shutdown_grace_seconds, rt.stop_all_calls, args=(StopReason.SHUTDOWN,))
    timer.daemon = True
    timer.start()


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    shutdown_runtime()


@app.task(name=PROCESS_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def process_query(query_id: str) -> None:
    """Process one delivery of a query id; the row decides whether anything happens."""
    try:
        qid = uuid.UUID(query_id)
    except (ValueError, TypeError):
        log.error("malformed task argument dropped")
        return
    token = query_id_var.set(str(qid))
    try:
        rt = runtime()
        outcome = rt.run(processing.process(rt, qid))
        if outcome.retry_in is not None and outcome.retry_in <= MAX_ETA_SECONDS:
            try:
                rt.publisher.publish_sync(qid, countdown=outcome.retry_in)
            except Exception as exc:  # noqa: BLE001 - the row is pending and due; the sweeper re-sends it
                log.warning("retry publish failed", extra={"error": type(exc).__name__})
    finally:
        query_id_var.reset(token)
