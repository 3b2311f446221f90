"""A model's dispatcher: runs the work that waits for the upstream budget, in fair order, as it allows.

When the budget refuses a delivery, its claim is given back (the row stays pending, its attempts unchanged)
and the message is acked: waiting holds no thread, no connection and no message. This coroutine, one per
model per worker process, on the runtime's loop, then repeats: sleep exactly as long as the budget says
(with jitter: no polling storm, no stampede at reopen), claim the model's next due row in fair order
(`claim_next_fair`: users take turns, interactive before batch), take its budget, and start its attempt
(it looks at the budget before claiming, so a refusal costs no database write)
under the worker's concurrency. It stops when no row is due. While it runs, a waiters marker in Redis makes
every worker's new deliveries of the model join the wait instead of jumping the queue.

The row stays the truth: if the process dies, the waiting rows are pending and due, and once its marker lapses
the sweeper re-sends them (STALE_PENDING_SECONDS; while the marker stands it leaves them to the dispatcher); a
Redis wipe loses only the budget's state (see shared/upstream.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from datetime import timedelta

from shared.logging import query_id_var
from shared.metrics import TASKS, UPSTREAM_WAIT_SECONDS, UPSTREAM_WAITS
from shared.repositories import queries_asyncpg as repo
from shared.repositories.queries_asyncpg import Claim
from shared.upstream import Grant, Refusal
from worker import processing
from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

# How long the waiters marker outlives the dispatcher's last sign of life.
MARKER_SECONDS = 10.0
# A fair claim can miss while another worker holds the row it picked (SKIP LOCKED): look again this often.
MISS_RETRIES = 3


async def drain(rt: WorkerRuntime, model: str) -> None:
    """Run the model's due pending rows as the budget allows; return when none is left."""
    try:
        await _drain(rt, model)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the sweeper re-sends what is left; the next deferral restarts us
        log.warning("dispatcher stopped", extra={"error": type(exc).__name__, "kind": model})
    finally:
        rt.draining.pop(model, None)


async def _drain(rt: WorkerRuntime, model: str) -> None:
    settings = rt.settings
    lease = timedelta(seconds=settings.lease_seconds)
    ageing = timedelta(seconds=settings.batch_ageing_seconds)
    misses = 0
    # What the last row reserved: the look before a claim asks for about as much.
    hint = settings.upstream_output_estimate
    while True:
        await rt.budget.mark_waiting(model, MARKER_SECONDS)
        await rt.dispatch_slots.acquire()
        started = False
        try:
            # Look before claiming: a refusal here costs no database write (no claim to give back).
            look = await rt.budget.acquire(model, hint, dry=True)
            if isinstance(look, Refusal):
                UPSTREAM_WAITS.labels(model=model, reason=look.reason).inc()
                UPSTREAM_WAIT_SECONDS.labels(model=model).observe(look.wait_seconds)
                await rt.budget.mark_waiting(model, MARKER_SECONDS + look.wait_seconds)
                await asyncio.sleep(look.wait_seconds)
                continue
            claim = await processing._run_autocommitted(
                rt, lambda conn: repo.claim_next_fair(conn, model, rt.owner, lease, ageing)
            )
            if claim is None:
                misses += 1
                if misses > MISS_RETRIES:
                    await rt.budget.clear_waiting(model)
                    return
                await asyncio.sleep(0.05 * misses)
                continue
            misses = 0
            hint = rt.budget.estimate(claim.prompt, claim.system, claim.history, claim.max_tokens)
            budget = await rt.budget.acquire(model, hint)
            if isinstance(budget, Refusal):
                await _wait(rt, claim, budget)
                continue
            _start(rt, claim, budget)
            started = True
        finally:
            if not started:
                rt.dispatch_slots.release()


async def _wait(rt: WorkerRuntime, claim: Claim, refusal: Refusal) -> None:
    """Give the claim back (not an attempt) and sleep until the budget says it may have room."""
    UPSTREAM_WAITS.labels(model=claim.model, reason=refusal.reason).inc()
    await processing.give_back(rt, claim)
    await processing._run_autocommitted(rt, lambda conn: repo.return_turn(conn, claim.query_id))
    await rt.budget.mark_waiting(claim.model, MARKER_SECONDS + refusal.wait_seconds)
    UPSTREAM_WAIT_SECONDS.labels(model=claim.model).observe(refusal.wait_seconds)
    await asyncio.sleep(refusal.wait_seconds)


def _start(rt: WorkerRuntime, claim: Claim, grant: Grant) -> None:
    async def attempt() -> None:
        query_id_var.set(str(claim.query_id))
        try:
            outcome = await processing.run_attempt(rt, claim, grant)
        finally:
            rt.dispatch_slots.release()
        TASKS.labels(outcome=outcome.kind).inc()
        if outcome.retry_in is not None:
            # No Celery message carries this query now: re-send it for its retry (or, handed back at
            # shutdown, at once), as the task would. A failed publish leaves the row to the sweeper.
            await asyncio.sleep(outcome.retry_in)
            await rt.publisher.publish(claim.query_id)

    task = asyncio.create_task(attempt(), context=contextvars.Context())
    rt.dispatched.add(task)
    task.add_done_callback(rt.dispatched.discard)
