"""One attempt at a query: claim, call the model, write the outcome.

Each step is one guarded statement straight from the asyncpg repository, autocommitted on its own: the claim
must be visible to other workers before the slow call starts.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, TypeVar

import asyncpg
from redis.exceptions import RedisError

from shared import llm
from shared.cache import CachedAnswer, response_cache_for
from shared.db import DATABASE_UNAVAILABLE
from shared.events import EventType
from shared.metrics import (
    LLM_CALLS_IN_FLIGHT,
    LLM_ERRORS,
    LLM_REQUEST_DURATION,
    LLM_TOKENS,
    TASK_RETRIES,
    TASKS,
    UPSTREAM_WAITS,
)
from shared.models import TERMINAL_STATUSES, QueryStatus
from shared.repositories import queries_asyncpg as repo
from shared.repositories.queries_asyncpg import Claim
from shared.scriptbatch import ScriptBatch
from shared.services import webhooks
from shared.services.events import end_event
from shared.upstream import Grant, Refusal
from worker.runtime import StopReason, WorkerRuntime
from worker.streaming import DeltaSink

log = logging.getLogger(__name__)
T = TypeVar("T")

# A lost final write would throw away a paid-for answer: retry the write, never the call.
WRITE_RETRY_DELAYS = (0.2, 0.5, 1, 2, 4, 8, 15)


class OutcomeKind(StrEnum):
    """What one delivery did; the values are the `outcome` label of `aiq_tasks_total`."""

    COMPLETED = "completed"
    FAILED = "failed"
    RETRIED = "retried"
    CANCELLED = "cancelled"
    # Handed back at shutdown.
    RELEASED = "released"
    # The row was not claimable: a duplicate or late delivery.
    SKIPPED = "skipped"
    # The attempt no longer owned the row: its write was discarded.
    LOST = "lost"
    # The upstream budget said "not now": the row waits, pending, for this worker's dispatcher (no attempt).
    DEFERRED = "deferred"


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: OutcomeKind
    retry_in: float | None = None
    # For the task's state in Flower: the attempt this delivery ran, the error code it wrote, tokens used.
    attempt: int | None = None
    error_code: str | None = None
    total_tokens: int | None = None


def _outcome(
    status: QueryStatus | None,
    kind: OutcomeKind,
    retry_in: float | None = None,
    *,
    attempt: int | None = None,
    error_code: str | None = None,
    total_tokens: int | None = None,
) -> Outcome:
    """What an outcome write did: nothing (`lost`), or `kind` unless a cancel that came in meanwhile won."""
    if status is None:
        return Outcome(OutcomeKind.LOST, attempt=attempt)
    if status is QueryStatus.CANCELLED:
        return Outcome(OutcomeKind.CANCELLED, attempt=attempt)
    return Outcome(kind, retry_in=retry_in, attempt=attempt, error_code=error_code, total_tokens=total_tokens)


async def _run_autocommitted(rt: WorkerRuntime, statement: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run one statement on a pooled connection (it commits on its own), riding out a database restart.

    Every step is a guarded UPDATE, so running it again after an unknown outcome is harmless.
    """
    for delay in (*WRITE_RETRY_DELAYS, None):
        try:
            async with rt.raw_pool.acquire() as conn:
                return await statement(conn)
        except DATABASE_UNAVAILABLE as exc:
            if delay is None:
                raise
            log.warning("database step failed; retrying", extra={"error": type(exc).__name__, "delay_s": delay})
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def _end(
    rt: WorkerRuntime,
    claim: Claim,
    written: QueryStatus | None,
    *,
    sink: DeltaSink | None = None,
    used_tokens: int = 0,
    answer: CachedAnswer | None = None,
    settle: Callable[[ScriptBatch | None], Any] | None = None,
    **event: Any,
) -> None:
    """What follows an outcome write, in one Redis round trip: a write that ended the query settles its token
    reservation (once: the reservation is the marker), an answered call settles its upstream budget (`settle`,
    from `_answered_settle`), a completion fills the response cache if its query
    asked for it (the script finds the API's intent, else does nothing), the attempt's text its sink had not
    sent yet is appended, and the event for the status the write left goes to the log last, so a client woken
    by it finds the rest done (the delta then sends no notice of its own: the event's wakes its readers). Then,
    for a claim that saw a webhook target, the `webhooks.deliver` kick (the outbox rows were written with the
    terminal write).

    Redis down costs what each step alone would: the reservation lapses with its window, the answer is not
    cached, readers replay the row. Never raises.
    """
    ended = written in TERMINAL_STATUSES
    batch = ScriptBatch(rt.redis)
    if settle is not None:
        settle(batch)
    if ended:
        rt.limiter.settle_in(batch, claim.query_id, used_tokens)
    if written is QueryStatus.COMPLETED and answer is not None:
        response_cache_for(rt.redis, rt.settings).store_in(batch, claim.query_id, answer)
    told = end_event(written, **event)
    appends: dict[int, EventType] = {}
    if sink is not None:
        index = sink.rest_in(batch, notify=told is None)
        if index is not None:
            appends[index] = EventType.DELTA
    if told is not None:
        appends[rt.events.append_in(batch, claim.query_id, told[0], told[1], claim.attempt)] = told[0]
    try:
        results = await batch.run()
    except (RedisError, OSError) as exc:
        log.warning("query end not recorded in Redis", extra={"error": type(exc).__name__})
    else:
        for index, result in enumerate(results):
            if index in appends:
                rt.events.landed(claim.query_id, appends[index], result)
            elif isinstance(result, Exception):
                log.warning("query end step failed in Redis", extra={"error": type(result).__name__})
    if ended and claim.webhook:
        await webhooks.on_query_ended(rt.raw_pool, rt.publisher, claim.query_id)


async def process(rt: WorkerRuntime, query_id: uuid.UUID) -> Outcome:
    """Run at most one LLM call for this delivery; a duplicate or late delivery does nothing."""
    outcome = await _process(rt, query_id)
    TASKS.labels(outcome=outcome.kind).inc()
    return outcome


async def _process(rt: WorkerRuntime, query_id: uuid.UUID) -> Outcome:
    if rt.draining:
        # This process already runs a dispatcher for waiting work: a delivery of that model joins the wait
        # (the dispatcher picks rows in fair order) at the cost of a read, not a claim and its undoing.
        model = await _run_autocommitted(rt, lambda conn: repo.pending_model(conn, query_id))
        if model is not None and model in rt.draining and not rt.draining[model].done():
            UPSTREAM_WAITS.labels(model=model, reason="queued").inc()
            return Outcome(OutcomeKind.DEFERRED)
    # If the claim committed but its answer was lost to a restart, the retry finds the row running and skips;
    # the lease then expires and the sweeper hands the query back. Nothing is called twice.
    lease = timedelta(seconds=rt.settings.lease_seconds)
    claim = await _run_autocommitted(rt, lambda conn: repo.claim(conn, query_id, rt.owner, lease))
    if claim is None:
        log.info("delivery skipped: query is not claimable")
        return Outcome(OutcomeKind.SKIPPED)
    budget = await rt.budget.acquire(claim.model, _estimate(rt, claim), fresh=True)
    if isinstance(budget, Refusal):
        return await defer(rt, claim, budget)
    return await run_attempt(rt, claim, budget)


def _estimate(rt: WorkerRuntime, claim: Claim) -> int:
    return rt.budget.estimate(claim.prompt, claim.system, claim.history, claim.max_tokens)


async def give_back(rt: WorkerRuntime, claim: Claim) -> QueryStatus | None:
    """Give an unused claim back (waiting for the budget is not an attempt). A cancel that came in meanwhile
    makes this write the query's end: then it is settled and told like any other end."""
    written = await _run_autocommitted(rt, lambda conn: repo.unclaim_attempt(conn, claim, delay=timedelta(0)))
    if written is QueryStatus.CANCELLED:
        await _end(rt, claim, written)
    return written


async def defer(rt: WorkerRuntime, claim: Claim, refusal: Refusal) -> Outcome:
    """No budget now: give the claim back and leave the row to the dispatcher."""
    UPSTREAM_WAITS.labels(model=claim.model, reason=refusal.reason).inc()
    if await give_back(rt, claim) is QueryStatus.CANCELLED:
        return Outcome(OutcomeKind.CANCELLED, attempt=claim.attempt - 1)
    rt.wake(claim.model)
    return Outcome(OutcomeKind.DEFERRED, attempt=claim.attempt - 1)


async def _within_budget(rt: WorkerRuntime, grant: Grant, call: Awaitable[llm.Completion]) -> llm.Completion:
    """Await the call; one that did not answer settles its budget here (a 429's closing, a refund, or the
    reservation standing), beside the outcome write. An answer's settle (`_answered_settle`) rides in the round
    trip of the query's end (`_end`).

    A call the provider refused is refunded in full.
    """
    try:
        result = await call
    except asyncio.CancelledError:
        # The provider counted the call when it started: its reservation stands, its slot frees.
        if grant.needs_settle():
            _spawn(rt, rt.budget.settle(grant, used_tokens=None))
        raise
    except Exception as exc:
        failure = llm.classify(exc)
        if failure.kind == "rate_limit":
            retry_after = failure.retry_after if failure.retry_after is not None else 1.0
            _spawn(
                rt,
                rt.budget.settle(
                    grant,
                    used_tokens=0,
                    ratelimit=failure.ratelimit,
                    answered=True,
                    throttled_after=retry_after,
                    throttled_kind=failure.limit_type,
                ),
            )
        elif grant.needs_settle():
            # An error answer used no tokens; a timeout or lost connection may have (the reservation stands).
            answered = failure.kind not in ("timeout", "connection", "other")
            _spawn(rt, rt.budget.settle(grant, used_tokens=0 if answered else None))
        raise
    return result


def _answered_settle(
    rt: WorkerRuntime, grant: Grant, capped: bool, result: llm.Completion
) -> Callable[[ScriptBatch | None], Any] | None:
    """How an answered call's budget is settled (None: nothing to settle): its real usage and the limits it
    advertised, queued on the batch of the query's end, or on its own (batch None: the end was not reached).

    What the provider counted is booked: OpenAI counts a call on arrival as its prompt estimate plus
    `max_tokens`, so a capped call's reservation stands (plus any excess); an uncapped one is trued up to its
    real usage."""
    if not grant.needs_settle(result.ratelimit):
        return None
    used = result.total_tokens
    if capped or used is None:
        used = max(grant.reserved_tokens, used or 0)

    def settle(batch: ScriptBatch | None) -> Any:
        if batch is None:
            return _spawn(rt, rt.budget.settle(grant, used_tokens=used, ratelimit=result.ratelimit, answered=True))
        return rt.budget.settle_in(batch, grant, used_tokens=used, ratelimit=result.ratelimit, answered=True)

    return settle


def _spawn(rt: WorkerRuntime, work: Awaitable[None]) -> None:
    task = asyncio.ensure_future(work)
    rt.dispatched.add(task)
    task.add_done_callback(rt.dispatched.discard)


async def run_attempt(rt: WorkerRuntime, claim: Claim, grant: Grant) -> Outcome:
    """The claimed attempt's call, within the budget it holds, and its outcome write."""
    sink = DeltaSink(rt.events, claim, rt.settings.event_flush_ms / 1000)
    try:
        return await _attempt(rt, claim, grant, sink)
    finally:
        # The text no end took (a lost lease, a write that gave up, a cancelled task) still goes to the log.
        await sink.flush()


async def _attempt(rt: WorkerRuntime, claim: Claim, grant: Grant, sink: DeltaSink) -> Outcome:
    call = asyncio.ensure_future(
        _within_budget(
            rt,
            grant,
            llm.complete(
                rt.llm,
                model=claim.model,
                prompt=claim.prompt,
                system=claim.system,
                history=claim.history,
                prompt_name=claim.prompt_name,
                temperature=claim.temperature,
                max_tokens=claim.max_tokens,
                headers={"X-AIQ-Query-Id": str(claim.query_id), "X-AIQ-Attempt": str(claim.attempt)},
                on_delta=sink.push,
                on_end=sink.end,
                stream=rt.settings.llm_stream,
            ),
        )
    )
    entry = rt.track(claim, call)
    LLM_CALLS_IN_FLIGHT.inc()
    stopped: StopReason | None = None
    failure: llm.UpstreamFailure | None = None
    try:
        result = await call
    except asyncio.CancelledError:
        if entry.stop_reason is None:
            raise
        stopped = entry.stop_reason
    except Exception as exc:  # noqa: BLE001 - every upstream error is classified, none escapes unrecorded
        failure = llm.classify(exc)
        LLM_ERRORS.labels(model=claim.model, type=failure.kind).inc()
    finally:
        LLM_CALLS_IN_FLIGHT.dec()
        rt.untrack(claim)
        # Every delta this attempt received is in the log before the event that ends it: the writer stops here,
        # what it had not sent rides with that event (`_end`).
        await sink.close()
    if stopped is not None:
        return await _handle_stop(rt, claim, stopped, sink)
    if failure is not None:
        return await _handle_failure(rt, claim, failure, sink)

    LLM_REQUEST_DURATION.labels(model=claim.model).observe(result.latency_ms / 1000)
    LLM_TOKENS.labels(model=claim.model, kind="prompt").inc(result.prompt_tokens or 0)
    LLM_TOKENS.labels(model=claim.model, kind="completion").inc(result.completion_tokens or 0)
    settle = _answered_settle(rt, grant, claim.max_tokens is not None, result)
    try:
        written = await _run_autocommitted(
            rt,
            lambda conn: repo.complete_attempt(
                conn,
                claim,
                response=result.text,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                total_tokens=result.total_tokens,
                latency_ms=result.latency_ms,
            ),
        )
    except BaseException:
        # The write gave up (or this task was cancelled): the budget is settled all the same.
        if settle is not None:
            settle(None)
        raise
    usage = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.total_tokens,
    }
    answer = CachedAnswer(result.text, result.prompt_tokens, result.completion_tokens, result.total_tokens)
    await _end(
        rt, claim, written, sink=sink, used_tokens=result.total_tokens or 0, answer=answer, settle=settle, usage=usage
    )
    if written is None:
        log.warning("completion discarded: attempt no longer owns the query", extra={"attempt": claim.attempt})
        return Outcome(OutcomeKind.LOST)
    log.info("query completed", extra={"attempt": claim.attempt, "latency_ms": result.latency_ms})
    return _outcome(written, OutcomeKind.COMPLETED, attempt=claim.attempt, total_tokens=result.total_tokens)


async def _handle_stop(rt: WorkerRuntime, claim: Claim, reason: StopReason, sink: DeltaSink) -> Outcome:
    extra = {"attempt": claim.attempt, "outcome": reason.value}
    if reason is StopReason.CANCEL:
        written = await _run_autocommitted(rt, lambda conn: repo.cancel_attempt(conn, claim))
        await _end(rt, claim, written, sink=sink)
        log.info("call stopped: query cancelled", extra=extra)
        return _outcome(written, OutcomeKind.CANCELLED, attempt=claim.attempt)
    if reason is StopReason.SHUTDOWN:
        written = await _run_autocommitted(rt, lambda conn: repo.release_attempt(conn, claim))
        await _end(rt, claim, written, sink=sink)
        log.info("call stopped: worker shutting down, query handed back", extra=extra)
        return _outcome(written, OutcomeKind.RELEASED, retry_in=0, attempt=claim.attempt)
    log.warning("call stopped: lease lost to another worker", extra=extra)
    return Outcome(OutcomeKind.LOST)


async def _handle_failure(rt: WorkerRuntime, claim: Claim, failure: llm.UpstreamFailure, sink: DeltaSink) -> Outcome:
    settings = rt.settings
    extra = {"attempt": claim.attempt, "kind": failure.kind, "code": failure.code}
    if failure.transient and claim.attempt < settings.max_attempts:
        delay = llm.backoff_seconds(settings, claim.attempt, failure.retry_after)
        written = await _run_autocommitted(
            rt,
            lambda conn: repo.retry_attempt(
                conn, claim, delay=timedelta(seconds=delay), code=failure.code, message=failure.message
            ),
        )
        await _end(rt, claim, written, sink=sink, code=failure.code, delay_s=delay, retry_after_s=failure.retry_after)
        TASK_RETRIES.labels(reason=failure.kind).inc()
        log.warning("transient upstream error; retry scheduled", extra={**extra, "delay_s": round(delay, 2)})
        return _outcome(written, OutcomeKind.RETRIED, retry_in=delay, attempt=claim.attempt, error_code=failure.code)

    if failure.transient:
        code = "upstream_retries_exhausted"
        message = f"Gave up after {claim.attempt} attempts: {failure.message}"
    else:
        code, message = failure.code, failure.message
    written = await _run_autocommitted(rt, lambda conn: repo.fail_attempt(conn, claim, code=code, message=message))
    await _end(rt, claim, written, sink=sink, code=code, message=message)
    log.warning("query failed", extra=extra)
    return _outcome(written, OutcomeKind.FAILED, attempt=claim.attempt, error_code=code)
