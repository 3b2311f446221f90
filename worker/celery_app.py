"""The Celery app: `celery -A worker.celery_app worker` starts a correctly configured worker."""

from __future__ import annotations

import logging
import math
import os
import threading
import uuid
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from celery.signals import (
    setup_logging,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from shared.config import get_settings
from shared.logging import configure_logging, query_id_var
from shared.metrics import start_worker_metrics_server
from shared.process import freeze_startup_heap
from shared.queue import BATCH_TASK, DELIVER_WEBHOOK_TASK, PROCESS_TASK, make_celery, max_eta_seconds
from shared.services.webhooks import DeliveryOutcome
from worker import batches, dispatcher, processing, recovery, webhooks
from worker.broker import guard_dead_channel, reuse_sync_client
from worker.runtime import BackgroundLoop, StopReason, WorkerRuntime, current_runtime, get_runtime, shutdown_runtime

# Celery's mingle asks the running workers, as a worker starts, for the task ids they revoked, and waits a second
# for their replies. AIQ never revokes a task (a cancel is the query row's status), so mingle only held every
# worker start, a scale-out's included, for ~1 s. Off by default: `celery -A worker.celery_app` loads this module
# before the `worker` command reads its options, so the environment default applies; an explicit
# CELERY_WORKER_WITHOUT_MINGLE=false turns it back on.
os.environ.setdefault("CELERY_WORKER_WITHOUT_MINGLE", "true")
settings = get_settings()
app = make_celery(settings)
# Each message's task runs on the runtime's asyncio loop (worker/pool.py), not on a thread of its own. By name, as
# Celery's own settings are: `celery inspect conf` and Flower serialise the configuration.
app.conf.worker_pool = "worker.pool:LoopPool"
guard_dead_channel(settings)
reuse_sync_client(settings)
log = logging.getLogger("worker")
# What every worker runs beside its tasks: lease renewal with cancel detection, and the recovery sweeper.
BACKGROUND_LOOPS: tuple[BackgroundLoop, ...] = (
    (recovery.heartbeat_loop, recovery.sweep_loop, webhooks.sweep_loop)
    if settings.sweep_interval_seconds > 0
    else (recovery.heartbeat_loop,)
)

# Longer retry delays are left to the sweeper (see shared/queue.py).
MAX_ETA_SECONDS = max_eta_seconds(settings)


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
    return get_runtime(settings, app, BACKGROUND_LOOPS, dispatcher.drain)


@worker_process_init.connect
def _start_child(**_: Any) -> None:
    runtime()


@worker_init.connect
def _start(**_: Any) -> None:
    # Before the broker connection: heartbeat and sweeper must run even while Redis is unreachable.
    rt = runtime()
    # Liveness means the loop that runs every call still answers, not merely that the process exists.
    start_worker_metrics_server(
        settings.worker_metrics_port, settings.worker_metrics_host, health_fn=lambda: rt.run(_alive(), timeout=5)
    )


async def _alive() -> bool:
    return True


@worker_ready.connect
def _ready(**_: Any) -> None:
    # Connected and consuming: what is alive now (Celery, the SDK, pools) stays; its collections would stall every
    # call in flight for ~0.1-0.2 s each.
    freeze_startup_heap()


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


class QueryFailed(Exception):
    """The query failed for good; the message is its error code and nothing else (never the prompt)."""


class AttemptRetried(Exception):
    """Why an attempt is retried: the error code the row records for it."""


def _summary(outcome: processing.Outcome) -> str:
    """The one line Flower shows as the task's result: status, attempts, tokens; never prompt or answer."""
    line = f"{outcome.kind} attempts={outcome.attempt}"
    return line if outcome.total_tokens is None else f"{line} tokens={outcome.total_tokens}"


def _id_argument(value: str) -> uuid.UUID:
    """Every task takes one id; anything else is dropped (logged without its value) instead of retried."""
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError):
        log.error("malformed task argument dropped")
        raise Ignore() from None


@app.task(
    bind=True,
    name=PROCESS_TASK,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    # The row caps attempts (MAX_ATTEMPTS); Celery's own count must never refuse a retry the row allows.
    max_retries=None,
    # A failed query is an outcome, not a worker error: logged without a traceback, state FAILURE.
    throws=(QueryFailed,),
)
def process_query(self: Task, query_id: str) -> str:
    """Process one delivery of a query id; the row decides whether anything happens.

    The task id is the query id, so Flower's task shows the query's course: RETRY for each retried attempt
    (Celery's own retry re-sends the message, same id, and acks this one), FAILURE with the error code, or
    SUCCESS with a one-line summary. Deliveries that change nothing (duplicates, stale attempts) end with
    `Ignore`, so they never overwrite the state the real attempt reported.
    """
    qid = _id_argument(query_id)
    token = query_id_var.set(str(qid))
    try:
        rt = runtime()
        outcome = rt.run(processing.process(rt, qid))
    finally:
        query_id_var.reset(token)
    kind = outcome.kind
    # A deferred query waits for the upstream budget in this worker's dispatcher: the message has done its job.
    if kind in (processing.OutcomeKind.SKIPPED, processing.OutcomeKind.LOST, processing.OutcomeKind.DEFERRED):
        raise Ignore()
    if kind is processing.OutcomeKind.FAILED:
        raise QueryFailed(outcome.error_code)
    if outcome.retry_in is not None:
        raise _retry(self, qid, outcome)
    return _summary(outcome)


def _retry(task: Task, query_id: uuid.UUID, outcome: processing.Outcome) -> Retry:
    """Re-send this task after the retry delay: the row's `next_attempt_at` still guards the claim.

    On Redis an ETA message waits in this worker's memory (gone if the worker dies), so a long delay (or a
    broker that refuses the re-send) is left to the sweeper, which re-sends the due pending row.
    """
    # Rounded up (never down: the row's `next_attempt_at` must have passed when the message comes back), so
    # Flower shows "Retry in 0.11s", not seventeen digits.
    delay = math.ceil((outcome.retry_in or 0.0) * 100) / 100
    if settings.broker_is_amqp:
        # RabbitMQ's delayed delivery counts whole seconds, from 1 (kombu refuses a countdown under 1 s).
        delay = max(1, math.ceil(delay))
    reason = AttemptRetried(outcome.error_code or outcome.kind.value)
    if delay <= MAX_ETA_SECONDS:
        try:
            return task.retry(countdown=delay, exc=reason, queue=settings.queue_name, throw=False)
        except Reject as exc:
            log.warning("retry publish failed", extra={"query_id": str(query_id), "error": type(exc.reason).__name__})
    return Retry(exc=reason, when=delay)


@app.task(name=DELIVER_WEBHOOK_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def deliver_webhook(delivery_id: str) -> str:
    """One attempt at a webhook delivery; retries are the row's (the webhook sweep re-sends due ones)."""
    did = _id_argument(delivery_id)
    rt = runtime()
    outcome = rt.run(webhooks.deliver(rt, did))
    if outcome is DeliveryOutcome.SKIPPED:
        raise Ignore()
    return outcome.value


@app.task(name=BATCH_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def advance_batch(batch_id: str) -> None:
    """One step of a `/v1/batches` batch, then the next step is sent (a lost one is re-sent by the sweeper)."""
    bid = _id_argument(batch_id)
    rt = runtime()
    delay = rt.run(batches.advance(rt, bid))
    if delay is not None and delay <= MAX_ETA_SECONDS:
        app.send_task(BATCH_TASK, args=[batch_id], countdown=delay or None, queue=settings.queue_name)
