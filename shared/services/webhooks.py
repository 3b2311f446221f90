"""Webhooks: the account's endpoint and secret, the delivery log, and one delivery attempt.

A query's end writes its outbox row by trigger (migration 0008); `on_query_ended` only sends the
`webhooks.deliver` message at once, and the workers' webhook sweep sends whatever is due and unsent, so a
crash between the terminal write and the message costs a sweep interval, never the event.
"""

from __future__ import annotations

import logging
import random
import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from shared.config import Settings
from shared.errors import Conflict, InvalidInput, NotFound
from shared.metrics import WEBHOOK_DELIVERIES, WEBHOOK_DELIVERY_LAG
from shared.models import DeliveryStatus, WebhookDelivery, WebhookEndpoint
from shared.queue import DELIVER_WEBHOOK_TASK, Publisher
from shared.repositories import webhooks as repo
from shared.schemas import WebhookDeliveryOut, WebhookEndpointOut, WebhookSecretOut
from shared.webhooks import new_secret, now_timestamp, send, signature_headers, validate_url

log = logging.getLogger(__name__)
SWEEP_BATCH = 500
# A receiver's Retry-After is honoured up to this (the whole retry schedule spans about a day).
RETRY_AFTER_CAP_SECONDS = 24 * 3600.0


class DeliveryOutcome(StrEnum):
    """The `outcome` label of `aiq_webhook_deliveries_total`, one per attempt."""

    DELIVERED = "delivered"
    RETRIED = "retried"
    FAILED = "failed"
    # 410 Gone: the delivery fails and the account's endpoint is switched off.
    GONE = "gone"
    # Not an attempt: the delivery was not due, already done, or held by another worker.
    SKIPPED = "skipped"


async def _publish_all(publisher: Publisher, ids: list[uuid.UUID]) -> int:
    sent = 0
    for delivery_id in ids:
        if not await publisher.publish(delivery_id, DELIVER_WEBHOOK_TASK):
            break
        sent += 1
    return sent


async def on_query_ended(db: asyncpg.Pool | asyncpg.Connection, publisher: Publisher, query_id: uuid.UUID) -> None:
    """Send the `webhooks.deliver` messages of a query that just ended; never raises (the sweep catches up)."""
    try:
        if isinstance(db, asyncpg.Pool):
            async with db.acquire() as conn:
                ids = await repo.mark_sent_for_query(conn, query_id)
        else:
            ids = await repo.mark_sent_for_query(db, query_id)
        if ids:
            await _publish_all(publisher, ids)
    except Exception as exc:  # noqa: BLE001 - the outbox row is safe; the sweep sends it
        log.warning("webhook kick failed; the sweep sends it", extra={"error": type(exc).__name__})


async def sweep(pool: asyncpg.Pool, publisher: Publisher, settings: Settings) -> int:
    """Send the messages of due deliveries that have none in flight; returns how many were sent."""
    stale = timedelta(seconds=settings.stale_pending_seconds)
    async with pool.acquire() as conn:
        ids = await repo.mark_sent_due(conn, stale, SWEEP_BATCH)
    return await _publish_all(publisher, ids) if ids else 0


def retry_delay(settings: Settings, attempt: int, retry_after: float | None) -> float | None:
    """Seconds until the next attempt after failed attempt number `attempt`, or None when it is the last."""
    delays = settings.webhook_retry_delays_seconds
    if attempt > len(delays):
        return None
    delay = delays[attempt - 1] * random.uniform(0.8, 1.2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP_SECONDS))
    return delay


async def deliver(pool: asyncpg.Pool, settings: Settings, delivery_id: uuid.UUID) -> DeliveryOutcome:
    """One attempt at a delivery: claim, sign, POST, record; returns the outcome. No connection is held
    while the receiver answers."""
    # Longer than an attempt can take (shared/webhooks.send: at most 3x the timeout), so a held row is never
    # sent twice at once; a worker that died mid-attempt lets go when it expires.
    lock = timedelta(seconds=settings.webhook_timeout_seconds * 3 + 30)
    async with pool.acquire() as conn:
        row = await repo.claim(conn, delivery_id, lock)
        if row is None:
            return DeliveryOutcome.SKIPPED
        secrets = await repo.live_secrets(conn, row["user_id"])
        if not secrets:
            await repo.ensure_secret(conn, row["user_id"], new_secret())
            secrets = await repo.live_secrets(conn, row["user_id"])
    body = row["body"].encode()
    attempt: int = row["attempts"]
    result = await send(settings, row["url"], signature_headers(secrets, str(delivery_id), now_timestamp(), body), body)
    error = result.error
    if result.ok:
        outcome, status = DeliveryOutcome.DELIVERED, DeliveryStatus.DELIVERED
        delay = 0.0
    elif result.status_code == 410:
        outcome, status, delay, error = DeliveryOutcome.GONE, DeliveryStatus.FAILED, 0.0, "gone"
    else:
        if error is None:
            error = f"HTTP {result.status_code}"
        next_in = retry_delay(settings, attempt, result.retry_after)
        if next_in is None:
            outcome, status, delay = DeliveryOutcome.FAILED, DeliveryStatus.FAILED, 0.0
        else:
            outcome, status, delay = DeliveryOutcome.RETRIED, DeliveryStatus.PENDING, next_in
    async with pool.acquire() as conn:
        await repo.record(
            conn,
            delivery_id,
            attempt,
            status=status,
            status_code=result.status_code,
            error=error,
            retry_in=timedelta(seconds=delay),
        )
        if outcome is DeliveryOutcome.GONE and row["to_endpoint"]:
            await repo.disable_endpoint(conn, row["user_id"], row["url"], "gone")
    WEBHOOK_DELIVERIES.labels(outcome=outcome).inc()
    if outcome is DeliveryOutcome.DELIVERED:
        WEBHOOK_DELIVERY_LAG.observe(max(0.0, (datetime.now(UTC) - row["created_at"]).total_seconds()))
    # The URL may carry a token of the receiver's: log the delivery and the outcome, not where it went.
    log.info(
        "webhook attempt",
        extra={
            "query_id": str(row["query_id"]),
            "outcome": outcome,
            "attempt": attempt,
            "status_code": result.status_code,
            "error": error,
            "delay_s": round(delay, 1),
        },
    )
    return outcome


def _endpoint_out(row: WebhookEndpoint) -> WebhookEndpointOut:
    if row.url is None:
        raise NotFound("No webhook endpoint is set", code="webhook_endpoint_not_found")
    return WebhookEndpointOut(
        url=row.url,
        enabled=row.disabled_at is None,
        disabled_at=row.disabled_at,
        disabled_reason=row.disabled_reason,
        updated_at=row.updated_at,
    )


async def get_endpoint(session: AsyncSession, user_id: uuid.UUID) -> WebhookEndpointOut:
    row = await repo.get_endpoint(session, user_id)
    if row is None:
        raise NotFound("No webhook endpoint is set", code="webhook_endpoint_not_found")
    return _endpoint_out(row)


async def set_endpoint(session: AsyncSession, settings: Settings, user_id: uuid.UUID, url: str) -> WebhookEndpointOut:
    """Set (or re-enable) the account's endpoint; 422 `webhook_url_invalid` says what is wrong with the URL."""
    try:
        validate_url(settings, url)
    except ValueError as exc:
        raise InvalidInput(
            str(exc),
            code="webhook_url_invalid",
            details=[{"loc": ["body", "url"], "msg": str(exc), "type": "webhook_url_invalid"}],
        ) from None
    return _endpoint_out(await repo.upsert_endpoint(session, user_id, new_secret(), url))


async def delete_endpoint(session: AsyncSession, user_id: uuid.UUID) -> None:
    """Remove the account's endpoint (the secret stays: per-query webhooks are signed with it); 404 if none."""
    row = await repo.get_endpoint(session, user_id)
    if row is None or row.url is None:
        raise NotFound("No webhook endpoint is set", code="webhook_endpoint_not_found")
    await repo.upsert_endpoint(session, user_id, new_secret(), None)


def _secret_out(row: WebhookEndpoint) -> WebhookSecretOut:
    expires = row.previous_secret_expires_at
    live = expires is not None and expires > datetime.now(UTC)
    return WebhookSecretOut(secret=row.secret, previous_secret_expires_at=expires if live else None)


async def get_secret(session: AsyncSession, user_id: uuid.UUID) -> WebhookSecretOut:
    """The account's signing secret, created on first request."""
    return _secret_out(await repo.ensure_endpoint_row(session, user_id, new_secret()))


async def rotate_secret(session: AsyncSession, settings: Settings, user_id: uuid.UUID) -> WebhookSecretOut:
    """A new secret; the old one also signs for WEBHOOK_SECRET_GRACE_SECONDS."""
    await repo.ensure_endpoint_row(session, user_id, new_secret())
    until = datetime.now(UTC) + timedelta(seconds=settings.webhook_secret_grace_seconds)
    return _secret_out(await repo.rotate_secret(session, user_id, new_secret(), until))


def _delivery_out(row: WebhookDelivery) -> WebhookDeliveryOut:
    out = WebhookDeliveryOut.model_validate(row)
    if row.status != DeliveryStatus.PENDING:
        out.next_attempt_at = None
    return out


async def list_deliveries(session: AsyncSession, user_id: uuid.UUID, query_id: uuid.UUID) -> list[WebhookDeliveryOut]:
    """The deliveries of one of the caller's queries; anybody else's query is a 404."""
    if not await repo.owns_query(session, user_id, query_id):
        raise NotFound("Query not found", code="query_not_found")
    return [_delivery_out(d) for d in await repo.list_deliveries(session, user_id, query_id)]


async def redeliver(
    session: AsyncSession, user_id: uuid.UUID, query_id: uuid.UUID, delivery_id: uuid.UUID
) -> WebhookDeliveryOut:
    """Make a delivery due now (same `webhook-id` and body); the caller publishes it once this has committed."""
    if not await repo.owns_query(session, user_id, query_id):
        raise NotFound("Query not found", code="query_not_found")
    row = await repo.redeliver(session, user_id, query_id, delivery_id)
    if row is None:
        if await repo.delivery_exists(session, user_id, delivery_id):
            raise Conflict("The delivery is being sent right now; try again shortly", code="delivery_in_progress")
        raise NotFound("Delivery not found", code="delivery_not_found")
    return _delivery_out(row)
