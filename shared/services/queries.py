"""The query lifecycle as the API drives it: submit, read, wait, list and cancel.

The worker's transitions (claim, outcome writes, leases, sweeps) are single guarded statements that it
runs straight from the repositories. Services never commit: the caller owns the transaction.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from shared.cache import CachedAnswer, ResponseCache
from shared.config import Settings
from shared.errors import AppError, Conflict, InvalidInput, NotFound
from shared.events import EventLog, EventType
from shared.limits import Limiter, LimitExceeded, estimate_tokens, prompt_chars
from shared.metrics import QUERIES_SUBMITTED
from shared.models import TERMINAL_STATUSES, QueryStatus
from shared.queue import Publisher
from shared.repositories import queries_asyncpg, queries_session
from shared.repositories.queries_common import RowLike
from shared.revocation import CheckNeeded
from shared.schemas import ConversationCreate, QueryAccepted, QueryCreate, QueryError, QueryOut, QueryPage, Usage
from shared.services import webhooks
from shared.services.credentials import DeferredCheck
from shared.services.events import tell_end
from shared.services.limits import effective_limits
from shared.wakeup import Waiter, Wakeup
from shared.webhooks import validate_url

log = logging.getLogger(__name__)


def _invalid(field: str, message: str, code: str) -> InvalidInput:
    return InvalidInput(message, code=code, details=[{"loc": ["body", field], "msg": message, "type": code}])


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def validate_submission(settings: Settings, body: QueryCreate, history: list[dict[str, str]] | None) -> str:
    """Checks that depend on configuration (`history`: the body's `_history_of`); returns the model to use."""
    model = body.model or settings.default_model
    if model not in settings.allowed_models:
        raise _invalid("model", f"Model is not allowed; choose one of {settings.allowed_models}", "model_not_allowed")
    if not body.query.strip():
        raise _invalid("query", "Query must not be empty or blank", "query_blank")
    # PostgreSQL text and jsonb cannot hold U+0000: refuse it here rather than fail the INSERT.
    texts = (
        ("query", body.query),
        ("system", body.system),
        ("metadata", body.metadata),
        ("prompt_name", _name_of(body)),
    )
    for field, value in texts:
        if _has_nul(value):
            raise _invalid(field, f"{field} must not contain NUL (U+0000) characters", "nul_character")
    if len(body.query) > settings.max_query_chars:
        raise _invalid("query", f"Query is longer than {settings.max_query_chars} characters", "query_too_long")
    if history is not None:
        if _has_nul(history):
            raise _invalid("history", "history must not contain NUL (U+0000) characters", "nul_character")
        # The final message has a query's bound (above); the whole conversation its own, larger one.
        if prompt_chars(body.query, None, history) > settings.max_conversation_chars:
            raise _invalid(
                "history",
                f"The conversation is longer than {settings.max_conversation_chars} characters",
                "conversation_too_long",
            )
    if body.system is not None and len(body.system) > settings.max_query_chars:
        raise _invalid(
            "system", f"System prompt is longer than {settings.max_query_chars} characters", "system_too_long"
        )
    if body.max_tokens is not None and body.max_tokens > settings.max_output_tokens:
        raise _invalid("max_tokens", f"max_tokens must be at most {settings.max_output_tokens}", "max_tokens_too_large")
    if body.webhook_url is not None:
        try:
            validate_url(settings, body.webhook_url)
        except ValueError as exc:
            raise _invalid("webhook_url", str(exc), "webhook_url_invalid") from None
    if body.metadata is not None and len(json.dumps(body.metadata)) > settings.max_metadata_bytes:
        raise _invalid(
            "metadata", f"metadata must serialize to at most {settings.max_metadata_bytes} bytes", "metadata_too_large"
        )
    return model


def _history_of(body: QueryCreate) -> list[dict[str, str]] | None:
    """A `/v1` conversation's earlier turns as the row stores them (a turn's `name` only when it has one); None for
    one prompt (and every native body)."""
    if isinstance(body, ConversationCreate) and body.history:
        return [turn.model_dump(exclude_none=True) for turn in body.history]
    return None


def _name_of(body: QueryCreate) -> str | None:
    """A `/v1` conversation's final user message's participant name; None without one (and for native bodies)."""
    return body.prompt_name if isinstance(body, ConversationCreate) else None


def _new_query(
    settings: Settings, user_id: uuid.UUID, body: QueryCreate, *, background: bool = False
) -> tuple[QueryAccepted, dict[str, Any]]:
    """Validate a submission; returns the 202 body and the row to insert (`background`: see the column)."""
    now, history = datetime.now(UTC), _history_of(body)
    model = validate_submission(settings, body, history)
    accepted = QueryAccepted(query_id=uuid.uuid4(), status=QueryStatus.PENDING, model=model, created_at=now)
    row = {
        "id": accepted.query_id,
        "user_id": user_id,
        "prompt": body.query,
        "system": body.system,
        "history": history,
        "prompt_name": _name_of(body),
        "model": accepted.model,
        "temperature": body.temperature,
        "max_tokens": body.max_tokens,
        "meta": body.metadata,
        "priority": body.priority,
        "webhook_url": body.webhook_url,
        "status": QueryStatus.PENDING.value,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
        "next_attempt_at": now,
        "response": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "total_tokens": None,
        "cached": False,
        "background": background,
        "started_at": None,
        "finished_at": None,
    }
    return accepted, row


def _answered_from_cache(accepted: QueryAccepted, row: dict[str, Any], answer: CachedAnswer) -> QueryAccepted:
    """Make the new row a completed query with the cached answer and usage; nothing is reserved for it."""
    row.update(
        status=QueryStatus.COMPLETED.value,
        response=answer.response,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        total_tokens=answer.total_tokens,
        cached=True,
        reserved_tokens=0,
        started_at=row["created_at"],
        finished_at=row["created_at"],
    )
    return accepted.model_copy(update={"status": QueryStatus.COMPLETED, "cached": True})


async def _take_limits_or_answer(
    db: asyncpg.Pool | asyncpg.Connection,
    settings: Settings,
    limiter: Limiter,
    cache: ResponseCache,
    user_id: uuid.UUID,
    body: QueryCreate,
    accepted: QueryAccepted,
    row: dict[str, Any],
    check: DeferredCheck | None = None,
) -> tuple[QueryAccepted, dict[str, str], str | None]:
    """A cache hit takes only the per-minute limit and completes the row at once; anything else takes every
    limit. Returns the 202 body, the `RateLimit` headers and, for a cache-enabled miss, the answer's key.
    `check`: the caller's revocation state, still to be read (`credentials.resolve_deferred`)."""
    key = cache.answer_key(user_id, row) if cache.wanted(body.cache) else None
    if key is not None and check is not None:
        # A hit takes only the per-minute limit, without the guard: the caller is checked before the lookup.
        await check.run()
        check = None
    answer = await cache.lookup(key) if key is not None else None
    if answer is None:
        return accepted, await _take_limits(db, settings, limiter, user_id, body, row, check), key
    # A hit costs no provider call: it is not charged to the token budget and holds no pending slot.
    headers = await limiter.take_request(user_id, await effective_limits(db, settings, user_id))
    return _answered_from_cache(accepted, row, answer), headers, None


async def _take_limits(
    db: asyncpg.Pool | asyncpg.Connection,
    settings: Settings,
    limiter: Limiter,
    user_id: uuid.UUID,
    body: QueryCreate,
    row: dict[str, Any],
    check: DeferredCheck | None = None,
) -> dict[str, str]:
    """Reserve the query's token estimate and take its rate and pending slots; the `RateLimit` headers.

    With `check`, the caller's revocation state is read in the same round trip (the script takes nothing for a
    credential it cannot clear); whatever it cannot clear gets the full check, then a take without the guard.
    """
    limits = await effective_limits(db, settings, user_id)
    row["reserved_tokens"] = estimate_tokens(body.query, body.system, row["history"], body.max_tokens, settings)
    if check is not None:
        try:
            return await limiter.take_submit(user_id, row["id"], limits, row["reserved_tokens"], guard=check.guard)
        except CheckNeeded:
            pass
        except LimitExceeded:
            raise
        except AppError:
            # Redis is down: the full check still answers from PostgreSQL (a 401 for a revoked credential).
            await check.run()
            raise
        await check.run()
    return await limiter.take_submit(user_id, row["id"], limits, row["reserved_tokens"])


async def _give_back(limiter: Limiter, query_id: uuid.UUID) -> None:
    """The row was not stored: release what was taken for it."""
    await limiter.settle_quietly(query_id, 0)


async def submit_query(
    pool: asyncpg.Pool,
    settings: Settings,
    limiter: Limiter,
    cache: ResponseCache,
    user_id: uuid.UUID,
    body: QueryCreate,
    check: DeferredCheck | None = None,
    *,
    background: bool = False,
) -> tuple[QueryAccepted, dict[str, str], dict[str, Any]]:
    """Take the user's limits, then store a pending query in one autocommitted INSERT; the caller enqueues it
    unless the response cache answered it (then the row is stored completed). `background`: how a
    `/v1/responses` create asked for it, kept for its reads.

    Returns the 202 body, the `RateLimit` headers and the row as stored (`stored_view`). A refusal stores
    nothing. `check`: the caller's revocation state, read with the limits (`credentials.resolve_deferred`).
    """
    accepted, row = _new_query(settings, user_id, body, background=background)
    accepted, headers, cache_key = await _take_limits_or_answer(
        pool, settings, limiter, cache, user_id, body, accepted, row, check
    )
    try:
        async with pool.acquire() as conn:
            await queries_asyncpg.insert(conn, **row)
    except BaseException:
        await _give_back(limiter, accepted.query_id)
        raise
    if cache_key is not None:
        await cache.expect(accepted.query_id, cache_key)
    return accepted, headers, row


def stored_view(row: dict[str, Any]) -> QueryOut:
    """The public view of a row `submit_query` has just stored: what reading it back before its publish would
    give (pending, or completed from the cache), without the read."""
    return to_out({**row, "error_code": None, "error_message": None, "cancel_requested_at": None})


async def submit_query_in(
    conn: asyncpg.Connection, settings: Settings, limiter: Limiter, user_id: uuid.UUID, body: QueryCreate
) -> QueryAccepted:
    """Take the user's limits and INSERT a pending query inside the caller's transaction (a batch's lines).

    The caller publishes after its commit and, if the transaction rolls back, gives the limits back with
    `release_limits`. A refusal (LimitExceeded) stores nothing and takes nothing.
    """
    accepted, row = _new_query(settings, user_id, body)
    await _take_limits(conn, settings, limiter, user_id, body, row)
    try:
        await queries_asyncpg.insert(conn, **row)
    except BaseException:
        await _give_back(limiter, accepted.query_id)
        raise
    return accepted


async def release_limits(limiter: Limiter, query_ids: list[uuid.UUID]) -> None:
    """Queries whose INSERT did not commit: give back what was taken for them."""
    for query_id in query_ids:
        await _give_back(limiter, query_id)


_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def request_fingerprint(body: QueryCreate) -> str:
    """What "the same body" means for an idempotency key: the parsed request, canonically serialized."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def submit_query_once(
    pool: asyncpg.Pool,
    settings: Settings,
    limiter: Limiter,
    cache: ResponseCache,
    user_id: uuid.UUID,
    body: QueryCreate,
    key: str,
    check: DeferredCheck | None = None,
) -> tuple[QueryAccepted, bool, dict[str, str]]:
    """Submit under an `Idempotency-Key` in one transaction; returns the response, whether it is a replay and
    the `RateLimit` headers (none for a replay, which takes no limits).

    The transaction is this function's own: it has committed when it returns, so the caller may publish.
    `check`: the caller's revocation state, read first (a replay takes no limits to read it with).
    """
    if check is not None:
        await check.run()
    if not _IDEMPOTENCY_KEY.match(key):
        raise AppError(
            "Idempotency-Key must be 1-255 visible ASCII characters", status_code=400, code="invalid_idempotency_key"
        )
    taken: list[uuid.UUID] = []
    try:
        async with pool.acquire() as conn, conn.transaction():
            return await _submit_under_key(conn, settings, limiter, cache, user_id, body, key, taken)
    except BaseException:
        # Limits were taken but the transaction (and its row) did not commit.
        for query_id in taken:
            await _give_back(limiter, query_id)
        raise


async def _submit_under_key(
    conn: asyncpg.Connection,
    settings: Settings,
    limiter: Limiter,
    cache: ResponseCache,
    user_id: uuid.UUID,
    body: QueryCreate,
    key: str,
    taken: list[uuid.UUID],
) -> tuple[QueryAccepted, bool, dict[str, str]]:
    if not await queries_asyncpg.lock_idempotency_key(conn, user_id, key):
        raise Conflict("A request with this Idempotency-Key is still in progress", code="idempotency_key_in_use")
    fingerprint = request_fingerprint(body)
    existing = await queries_asyncpg.get_idempotency_key(conn, user_id, key)
    if existing is not None:
        if existing["request_hash"] != fingerprint:
            raise InvalidInput(
                "This Idempotency-Key was used with a different request body", code="idempotency_key_reused"
            )
        return QueryAccepted.model_validate(existing["response"]), True, {}
    accepted, row = _new_query(settings, user_id, body)
    accepted, headers, cache_key = await _take_limits_or_answer(
        conn, settings, limiter, cache, user_id, body, accepted, row
    )
    taken.append(accepted.query_id)
    await queries_asyncpg.insert(conn, **row)
    if cache_key is not None:
        # Before the commit is harmless: an intent whose row never commits lapses unused.
        await cache.expect(accepted.query_id, cache_key)
    await queries_asyncpg.save_idempotency_key(
        conn,
        user_id=user_id,
        key=key,
        request_hash=fingerprint,
        query_id=accepted.query_id,
        response=accepted.model_dump(mode="json"),
        ttl=timedelta(seconds=settings.idempotency_ttl_seconds),
    )
    return accepted, False, headers


def _found(query: RowLike | None) -> RowLike:
    if query is None:
        raise NotFound("Query not found", code="query_not_found")
    return query


async def get_query(conn: asyncpg.Connection, user_id: uuid.UUID, query_id: uuid.UUID) -> QueryOut:
    """The caller's query, or 404 for a missing one and for anybody else's alike."""
    return to_out(_found(await queries_asyncpg.fetch_for_user(conn, query_id, user_id)))


async def wait_for_query(
    pool: asyncpg.Pool,
    user_id: uuid.UUID,
    query_id: uuid.UUID,
    wait: float,
    wakeup: Wakeup,
    *,
    watching: Waiter | None = None,
) -> QueryOut:
    """The caller's query once it is terminal, or as it stands after `wait` seconds (0: at once).

    One read when it starts and one when the wake-up says the query ended (or at the deadline); in between
    it holds no connection and costs nothing. While the wake-up subscriber is disconnected, a bounded
    fallback re-read (WAKEUP_FALLBACK_SECONDS) stands in for the notices it may miss.

    `watching`: the caller's waiter for this query, registered before anything could end it (a new query,
    before its publish): then there is nothing to read before the first wake-up, and the wait costs one read.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    with contextlib.ExitStack() as stack:
        if watching is None:
            # Watch before the first read, so an end between the read and the wait still wakes us.
            waiter = stack.enter_context(wakeup.watch(query_id, only_terminal=True))
        else:
            waiter = watching
            await waiter.wait(wakeup.timeout(deadline - loop.time()))
        while True:
            async with pool.acquire() as conn:
                query = await get_query(conn, user_id, query_id)
            left = deadline - loop.time()
            if query.status in TERMINAL_STATUSES or left <= 0:
                return query
            await waiter.wait(wakeup.timeout(left))


def encode_cursor(query: RowLike) -> str:
    raw = f"{query['created_at'].isoformat()}|{query['id']}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, _, query_id = raw.partition("|")
        parsed = datetime.fromisoformat(created_at)
        if parsed.tzinfo is None:
            raise ValueError("naive timestamp")
        return parsed, uuid.UUID(query_id)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput(
            "Invalid cursor",
            code="invalid_cursor",
            details=[{"loc": ["query", "cursor"], "msg": "not a cursor from this API", "type": "invalid_cursor"}],
        ) from exc


async def list_queries(
    session: AsyncSession, user_id: uuid.UUID, *, status: QueryStatus | None, cursor: str | None, limit: int
) -> QueryPage:
    """One page of the caller's queries, newest first."""
    before = decode_cursor(cursor) if cursor else None
    rows = await queries_session.list_for_user(session, user_id, status=status, before=before, limit=limit + 1)
    items, more = rows[:limit], len(rows) > limit
    return QueryPage(items=[to_out(q) for q in items], next_cursor=encode_cursor(items[-1]) if more else None)


def to_out(query: RowLike) -> QueryOut:
    """The public view of a row."""
    code = query["error_code"]
    return QueryOut(
        query_id=query["id"],
        status=QueryStatus(query["status"]),
        query=query["prompt"],
        system=query["system"],
        model=query["model"],
        temperature=query["temperature"],
        max_tokens=query["max_tokens"],
        metadata=query["meta"],
        priority=query["priority"],
        response=query["response"],
        error=QueryError(code=code, message=query["error_message"] or "") if code else None,
        # An object of nulls says nothing: usage is null until (and unless) the model reported it.
        cached=query["cached"],
        background=query["background"],
        usage=Usage(
            prompt_tokens=query["prompt_tokens"],
            completion_tokens=query["completion_tokens"],
            total_tokens=query["total_tokens"],
        )
        if query["total_tokens"] is not None or query["prompt_tokens"] is not None
        else None,
        attempts=query["attempts"],
        cancel_requested=query["cancel_requested_at"] is not None,
        created_at=query["created_at"],
        started_at=query["started_at"],
        finished_at=query["finished_at"],
    )


async def after_outcome(
    db: asyncpg.Pool | asyncpg.Connection,
    publisher: Publisher | None,
    limiter: Limiter,
    events: EventLog,
    query_id: uuid.UUID,
    status: QueryStatus | None,
    attempt: int | None,
    *,
    used_tokens: int = 0,
    **told: Any,
) -> None:
    """What follows an API-side write that ended a query (a cancel, the cancel before a delete): settle its token
    reservation, tell its event log and send its webhook messages (the outbox row came with the write; without
    a publisher the workers' webhook sweep sends them). The sweeper's `worker_lost` ends run it too;
    the worker's own ends batch the same steps in one round trip (worker/processing.py `_end`).
    `status` None does nothing."""
    ended = status in TERMINAL_STATUSES
    if ended:
        await limiter.settle_quietly(query_id, used_tokens)
    await tell_end(events, query_id, status, attempt, **told)
    if ended and publisher is not None:
        await webhooks.on_query_ended(db, publisher, query_id)


async def dispatch_accepted(
    pool: asyncpg.Pool, publisher: Publisher, events: EventLog, accepted: QueryAccepted
) -> None:
    """After a new query's row has committed, whichever door it came in by: a cache hit has ended already (its
    INSERT wrote the webhook outbox row, migration 0010), so only its webhook goes; anything else gets its
    `queued` event and then the publish (a failed one leaves the row pending for the sweeper; the 202 stays true),
    in one Redis round trip when the broker is the app's Redis.
    """
    QUERIES_SUBMITTED.labels(model=accepted.model).inc()
    extra = {"query_id": str(accepted.query_id), "model": accepted.model}
    if accepted.cached:
        log.info("query answered from cache", extra=extra)
        await webhooks.on_query_ended(pool, publisher, accepted.query_id)
        return
    # The log's first event, ahead of the message so that it precedes the worker's `started`. Redis is up (the
    # limits just used it); a failure is logged and streams replay the row instead. No wake-up notice: the client
    # learns the id from the response, so nobody waits on it yet.
    first = events.batch()
    queued = events.append_in(first, accepted.query_id, EventType.QUEUED, {"model": accepted.model}, None, notify=False)
    published = await publisher.publish(accepted.query_id, first=first)
    events.landed(accepted.query_id, EventType.QUEUED, first.results[queued])
    log.info("query submitted", extra={**extra, "outcome": "sent" if published else "deferred"})


async def dispatch_and_wait(
    pool: asyncpg.Pool,
    publisher: Publisher,
    events: EventLog,
    wakeup: Wakeup,
    accepted: QueryAccepted,
    row: dict[str, Any],
    wait: float,
) -> QueryOut:
    """`dispatch_accepted` for the query `submit_query` has just stored (`row`), then the query once it is
    terminal, or as it stands after `wait` seconds. The wait watches it from before the publish, so it costs one
    read, after the end; a cache hit (stored completed) reads nothing."""
    if accepted.cached:
        await dispatch_accepted(pool, publisher, events, accepted)
        return stored_view(row)
    with wakeup.watch(accepted.query_id, only_terminal=True) as waiter:
        await dispatch_accepted(pool, publisher, events, accepted)
        return await wait_for_query(pool, row["user_id"], accepted.query_id, wait, wakeup, watching=waiter)


async def cancel_query(
    conn: asyncpg.Connection,
    limiter: Limiter,
    user_id: uuid.UUID,
    query_id: uuid.UUID,
    *,
    events: EventLog,
    publisher: Publisher | None = None,
) -> RowLike:
    """pending → cancelled now; running → cancel requested; terminal → 409; not the caller's → 404.

    A pending query's end is told here; a running one's by its worker when the call stops.
    """
    # A query can flip between pending and running (claim, retry) under us: try both transitions again then.
    for _ in range(3):
        cancelled = await queries_asyncpg.cancel_pending(conn, query_id, user_id)
        if cancelled is not None:
            attempt = cancelled["attempts"] or None
            await after_outcome(conn, publisher, limiter, events, query_id, QueryStatus.CANCELLED, attempt)
            return cancelled
        requested = await queries_asyncpg.request_cancel(conn, query_id, user_id)
        if requested is not None:
            return requested
        query = _found(await queries_asyncpg.fetch_for_user(conn, query_id, user_id))
        if query["status"] in TERMINAL_STATUSES:
            raise Conflict(f"Query is already {query['status']}", code="query_not_cancellable")
    raise Conflict("Query is changing state; try again", code="query_busy")


async def delete_query(
    conn: asyncpg.Connection,
    limiter: Limiter,
    user_id: uuid.UUID,
    query_id: uuid.UUID,
    *,
    events: EventLog,
    publisher: Publisher | None = None,
) -> None:
    """Erase a query's prompt, system prompt, answer and metadata; its usage stays counted.

    A pending query is cancelled first; a running one is refused (409 `query_running`: cancel it, then
    delete), because its worker may still write the answer that is to be erased. Its event log, which
    holds the answer's text, goes too.
    """
    cancelled = await queries_asyncpg.cancel_pending(conn, query_id, user_id)
    if cancelled is not None:
        # Told like any cancel: open streams end now (they are woken) rather than at their idle re-read.
        attempt = cancelled["attempts"] or None
        await after_outcome(conn, publisher, limiter, events, query_id, QueryStatus.CANCELLED, attempt)
    if await queries_asyncpg.erase(conn, query_id, user_id):
        await events.discard(query_id)
        return
    _found(await queries_asyncpg.fetch_for_user(conn, query_id, user_id))
    raise Conflict("Query is running; cancel it, then delete it", code="query_running")


async def admin_get_query(conn: asyncpg.Connection, admin_id: uuid.UUID, query_id: uuid.UUID) -> QueryOut:
    """Any user's query, for an admin; the read is logged with the admin's id (never the prompt)."""
    query = _found(await queries_asyncpg.fetch_any(conn, query_id))
    log.info(
        "admin read a query",
        extra={"user_id": str(admin_id), "owner": str(query["user_id"]), "query_id": str(query_id)},
    )
    return to_out(query)


async def requeue_query(
    conn: asyncpg.Connection, settings: Settings, limiter: Limiter, query_id: uuid.UUID, *, events: EventLog
) -> QueryOut:
    """failed → pending (an admin's requeue); 409 unless the query failed.

    `attempts` is not reset: it is the fencing token of every attempt's writes and must never go back, so
    the query gets one more attempt (requeue again if that fails). Its reservation is taken again without
    limit checks, so the settle books its real usage against the owner's budget.
    """
    # One transaction: when Redis cannot take the reservation (503), the row stays failed rather than going
    # back to pending with its usage never booked; when the commit fails, the reservation is given back.
    taken = False
    try:
        async with conn.transaction():
            row = await queries_asyncpg.requeue_failed(conn, query_id)
            if row is None:
                query = _found(await queries_asyncpg.fetch_any(conn, query_id))
                raise Conflict(
                    f"Only a failed query can be requeued; this one is {query['status']}", code="query_not_failed"
                )
            limits = await effective_limits(conn, settings, row["user_id"])
            await limiter.take_submit(row["user_id"], query_id, limits, row["reserved_tokens"] or 0, force=True)
            taken = True
    except BaseException:
        if taken:
            await _give_back(limiter, query_id)
        raise
    # The log told a `failed` end: the story starts again, so the earlier events are trimmed (a follower from
    # the start must not stop at the old end) and the sequence numbers go on.
    await events.append_quietly(query_id, EventType.QUEUED, {"requeued": True}, reset=True)
    return to_out(_found(await queries_asyncpg.fetch_any(conn, query_id)))
