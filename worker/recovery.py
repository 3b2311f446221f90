"""Background duties of every worker: keep leases alive, notice cancels, and sweep for lost work.

Every worker sweeps; `FOR UPDATE SKIP LOCKED` lets any number of them do so at once without stepping on
each other, and there is no extra process to deploy or to forget. Each step is one session transaction,
committed when its block ends (rolled back if it raises).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from shared.models import TERMINAL_STATUSES
from shared.repositories import queries_session as repo
from shared.repositories.queries_session import WORKER_LOST_CODE, WORKER_LOST_MESSAGE
from shared.services import files
from shared.services.queries import after_outcome
from worker import batches
from worker.runtime import StopReason, WorkerRuntime

log = logging.getLogger(__name__)
SWEEP_BATCH = 500
# Retention runs with the sweeper but less often; each run deletes at most this many batches.
PURGE_INTERVAL_SECONDS = 60.0
PURGE_MAX_BATCHES = 20
# Expired files per transaction: each takes its content's chunk rows (up to 200 per 200 MB file) with it.
FILE_PURGE_BATCH = 50


async def heartbeat_once(rt: WorkerRuntime) -> None:
    """Renew the lease of every call in flight; stop the ones cancelled or no longer ours."""
    snapshot = list(rt.inflight)
    if not snapshot:
        return
    async with rt.sessionmaker.begin() as session:
        held = await repo.renew_leases(session, snapshot, rt.owner, timedelta(seconds=rt.settings.lease_seconds))
    for key in snapshot:
        if key[0] not in held:
            rt.stop_call(key, StopReason.LOST)
        elif held[key[0]]:
            rt.stop_call(key, StopReason.CANCEL)


async def heartbeat_loop(rt: WorkerRuntime) -> None:
    while True:
        await asyncio.sleep(rt.settings.heartbeat_seconds)
        try:
            await heartbeat_once(rt)
        except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the lease has slack for two
            log.warning("lease renewal failed", extra={"error": type(exc).__name__})


async def sweep_once(rt: WorkerRuntime) -> int:
    """Hand back expired leases, then re-send due pending rows whose message may be gone; returns how many."""
    settings = rt.settings
    stale = timedelta(seconds=settings.stale_pending_seconds)
    async with rt.sessionmaker.begin() as session:
        reclaimed = await repo.reclaim_expired_leases(session, settings.max_attempts, stale, SWEEP_BATCH)
        await repo.delete_expired_idempotency_keys(session, SWEEP_BATCH)
    # After the commit: a `worker_lost` or cancelled end releases its token reservation (the lost attempt's
    # usage is unknown, so none is booked).
    for query_id, status in reclaimed:
        if status in TERMINAL_STATUSES:
            await after_outcome(
                rt.raw_pool, rt.publisher, rt.limiter, rt.events, query_id, status, None,
                code=WORKER_LOST_CODE, message=WORKER_LOST_MESSAGE,
            )  # fmt: skip
    async with rt.sessionmaker.begin() as session:
        due = await repo.lock_stale_pending(session, stale, SWEEP_BATCH)
        # A model whose work waits for the upstream budget has a dispatcher claiming its due rows in fair order
        # (worker/dispatcher.py): a message would only be read and set aside. Its rows' stale clock restarts; if
        # that dispatcher dies, its marker lapses and the next stale window sends them.
        waiting = await rt.budget.waiting({model for _, model in due})
        held = [query_id for query_id, model in due if model in waiting]
        sent: list[uuid.UUID] = []
        for query_id in (query_id for query_id, model in due if model not in waiting):
            # Broker down: stop here, and leave the rest marked as not sent so the next sweep tries again.
            if not await rt.publisher.publish(query_id):
                break
            sent.append(query_id)
        await repo.mark_resent(session, sent + held)
    try:
        await batches.sweep(rt)
    except Exception as exc:  # noqa: BLE001 - batches wait for the next sweep; queries were swept already
        log.warning("batch sweep failed", extra={"error": type(exc).__name__})
    if reclaimed or due:
        outcome = f"reclaimed={len(reclaimed)} due={len(due)} held={len(held)}"
        log.info("sweep", extra={"count": len(sent), "outcome": outcome})
    return len(sent)


async def purge_once(rt: WorkerRuntime) -> int:
    """Retention: delete terminal rows finished more than RETENTION_DAYS ago, in batches; returns how many."""
    if not rt.settings.retention_days:
        return 0
    cutoff = datetime.now(UTC) - timedelta(days=rt.settings.retention_days)

    async def step() -> int:
        async with rt.sessionmaker.begin() as session:
            return await repo.purge_finished_before(session, cutoff, SWEEP_BATCH)

    return await _in_batches(step, SWEEP_BATCH, "retention purge")


async def purge_expired_files_once(rt: WorkerRuntime) -> int:
    """Delete files past their `expires_at` (they read as missing already), in batches; returns how many."""
    return await _in_batches(
        lambda: files.delete_expired(rt.raw_pool, FILE_PURGE_BATCH), FILE_PURGE_BATCH, "expired files purge"
    )


async def _in_batches(step: Callable[[], Awaitable[int]], batch: int, what: str) -> int:
    """Run a deleting `step` (one transaction, up to `batch` rows) until it deletes fewer, at most
    PURGE_MAX_BATCHES times per sweep; log and return how many in all."""
    total = 0
    for _ in range(PURGE_MAX_BATCHES):
        deleted = await step()
        total += deleted
        if deleted < batch:
            break
    if total:
        log.info(what, extra={"count": total})
    return total


async def sweep_loop(rt: WorkerRuntime) -> None:
    last_purge = 0.0
    while True:
        # Jitter keeps a fleet of workers from sweeping in lockstep.
        await asyncio.sleep(rt.settings.sweep_interval_seconds * random.uniform(0.8, 1.2))
        try:
            await sweep_once(rt)
            if time.monotonic() - last_purge >= PURGE_INTERVAL_SECONDS:
                last_purge = time.monotonic()
                await purge_once(rt)
                await purge_expired_files_once(rt)
        except Exception as exc:  # noqa: BLE001 - the next sweep tries again
            log.warning("sweep failed", extra={"error": type(exc).__name__})
