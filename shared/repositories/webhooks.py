"""Webhook SQL: the delivery path on raw asyncpg connections (worker, API cancel), the account's endpoint
and the delivery log on the API's AsyncSession.

The outbox rows themselves are written by the `queries_webhook_outbox` trigger (migration 0008) in the
transaction of the query's terminal write, and by `queries_webhook_outbox_insert` (0010) for a response-cache
hit, which is stored already completed.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

import asyncpg
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import DeliveryStatus, Query, WebhookDelivery, WebhookEndpoint
from shared.repositories.queries_common import RowLike

_MARK_SENT_FOR_QUERY = """
UPDATE webhook_deliveries SET sent_at = now()
WHERE query_id = $1 AND status = 'pending' AND next_attempt_at <= now()
RETURNING id
"""
# Due and not sent since it became due (or sent long ago: the message may be gone), oldest first.
_MARK_SENT_DUE = """
UPDATE webhook_deliveries SET sent_at = now()
WHERE id IN (
    SELECT id FROM webhook_deliveries
    WHERE status = 'pending' AND next_attempt_at <= now()
      AND (sent_at IS NULL OR sent_at < next_attempt_at OR sent_at < now() - $1::interval)
      AND (locked_until IS NULL OR locked_until < now())
    ORDER BY next_attempt_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
RETURNING id
"""
_ENSURE_SECRET = "INSERT INTO webhook_endpoints (user_id, secret) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING"  # noqa: S105
_CLAIM = """
UPDATE webhook_deliveries
SET locked_until = now() + $2::interval, attempts = attempts + 1, last_attempt_at = now()
WHERE id = $1 AND status = 'pending' AND next_attempt_at <= now()
  AND (locked_until IS NULL OR locked_until < now())
RETURNING id, user_id, query_id, url, to_endpoint, event_type, payload::text AS body, attempts, created_at
"""
_SECRETS = """
SELECT secret, CASE WHEN previous_secret_expires_at > now() THEN previous_secret END AS previous_secret
FROM webhook_endpoints WHERE user_id = $1
"""
_RECORD = """
UPDATE webhook_deliveries
SET status = $2::text, last_status_code = $3, last_error = $4, locked_until = NULL,
    next_attempt_at = CASE WHEN $2::text = 'pending' THEN now() + $5::interval ELSE next_attempt_at END,
    delivered_at = CASE WHEN $2::text = 'delivered' THEN now() END
WHERE id = $1 AND attempts = $6
"""
_DISABLE_ENDPOINT = """
UPDATE webhook_endpoints SET disabled_at = now(), disabled_reason = $3, updated_at = now()
WHERE user_id = $1 AND url = $2 AND disabled_at IS NULL
"""


async def mark_sent_for_query(conn: asyncpg.Connection, query_id: uuid.UUID) -> list[uuid.UUID]:
    """The query's due deliveries, marked as sent now (the caller publishes them)."""
    return [r["id"] for r in await conn.fetch(_MARK_SENT_FOR_QUERY, query_id)]


async def mark_sent_due(conn: asyncpg.Connection, stale: timedelta, limit: int) -> list[uuid.UUID]:
    """Due deliveries whose message was not sent since they became due (or may be lost), marked sent now."""
    return [r["id"] for r in await conn.fetch(_MARK_SENT_DUE, stale, limit)]


async def ensure_secret(conn: asyncpg.Connection, user_id: uuid.UUID, secret: str) -> None:
    """Give the account a signing secret unless it has one."""
    await conn.execute(_ENSURE_SECRET, user_id, secret)


async def claim(conn: asyncpg.Connection, delivery_id: uuid.UUID, lock: timedelta) -> RowLike | None:
    """Take a due pending delivery for one attempt (counted now); None when it is not due, done or held."""
    row: RowLike | None = await conn.fetchrow(_CLAIM, delivery_id, lock)
    return row


async def live_secrets(conn: asyncpg.Connection, user_id: uuid.UUID) -> list[str]:
    """The secrets that sign now: the current one, and the previous one during its grace period."""
    row = await conn.fetchrow(_SECRETS, user_id)
    if row is None:
        return []
    return [s for s in (row["secret"], row["previous_secret"]) if s]


async def record(
    conn: asyncpg.Connection,
    delivery_id: uuid.UUID,
    attempt: int,
    *,
    status: DeliveryStatus,
    status_code: int | None,
    error: str | None,
    retry_in: timedelta = timedelta(0),
) -> None:
    """Write an attempt's outcome (guarded by the attempt number, so a stale attempt writes nothing)."""
    await conn.execute(_RECORD, delivery_id, status.value, status_code, error, retry_in, attempt)


async def disable_endpoint(conn: asyncpg.Connection, user_id: uuid.UUID, url: str, reason: str) -> bool:
    """Switch the account's endpoint off if it is still this URL; True when it was on."""
    return str(await conn.execute(_DISABLE_ENDPOINT, user_id, url, reason)).endswith(" 1")


async def get_endpoint(session: AsyncSession, user_id: uuid.UUID) -> WebhookEndpoint | None:
    return await session.get(WebhookEndpoint, user_id)


async def upsert_endpoint(session: AsyncSession, user_id: uuid.UUID, secret: str, url: str | None) -> WebhookEndpoint:
    """Set (and enable) the account's endpoint URL, or clear it; the row gets `secret` if it is new."""
    stmt = pg_insert(WebhookEndpoint).values(user_id=user_id, secret=secret, url=url)
    stmt = stmt.on_conflict_do_update(
        index_elements=[WebhookEndpoint.user_id],
        set_={"url": url, "disabled_at": None, "disabled_reason": None, "updated_at": func.now()},
    )
    await session.execute(stmt)
    return await _reload(session, user_id)


async def ensure_endpoint_row(session: AsyncSession, user_id: uuid.UUID, secret: str) -> WebhookEndpoint:
    """The account's row, created with `secret` (and no URL) when it has none."""
    stmt = pg_insert(WebhookEndpoint).values(user_id=user_id, secret=secret).on_conflict_do_nothing()
    await session.execute(stmt)
    return await _reload(session, user_id)


async def rotate_secret(
    session: AsyncSession, user_id: uuid.UUID, secret: str, previous_until: datetime
) -> WebhookEndpoint:
    """Install a new secret; the old one keeps signing until `previous_until`."""
    stmt = (
        update(WebhookEndpoint)
        .where(WebhookEndpoint.user_id == user_id)
        .values(
            previous_secret=WebhookEndpoint.secret,
            previous_secret_expires_at=previous_until,
            secret=secret,
            updated_at=func.now(),
        )
    )
    await session.execute(stmt)
    return await _reload(session, user_id)


async def _reload(session: AsyncSession, user_id: uuid.UUID) -> WebhookEndpoint:
    stmt = select(WebhookEndpoint).where(WebhookEndpoint.user_id == user_id).execution_options(populate_existing=True)
    return (await session.execute(stmt)).scalar_one()


async def owns_query(session: AsyncSession, user_id: uuid.UUID, query_id: uuid.UUID) -> bool:
    stmt = select(Query.id).where(Query.id == query_id, Query.user_id == user_id, Query.deleted_at.is_(None))
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def list_deliveries(session: AsyncSession, user_id: uuid.UUID, query_id: uuid.UUID) -> Sequence[WebhookDelivery]:
    stmt = (
        select(WebhookDelivery)
        .where(WebhookDelivery.query_id == query_id, WebhookDelivery.user_id == user_id)
        .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
    )
    return (await session.execute(stmt)).scalars().all()


async def redeliver(
    session: AsyncSession, user_id: uuid.UUID, query_id: uuid.UUID, delivery_id: uuid.UUID
) -> WebhookDelivery | None:
    """Make a delivery due now again (same id, same body); None when it is not this user's or is being sent."""
    stmt = (
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.query_id == query_id,
            WebhookDelivery.user_id == user_id,
            (WebhookDelivery.locked_until.is_(None)) | (WebhookDelivery.locked_until < func.now()),
        )
        .values(status=DeliveryStatus.PENDING.value, next_attempt_at=func.now(), sent_at=func.now())
        .returning(WebhookDelivery.id)
    )
    if (await session.execute(stmt)).scalar_one_or_none() is None:
        return None
    found = select(WebhookDelivery).where(WebhookDelivery.id == delivery_id).execution_options(populate_existing=True)
    return (await session.execute(found)).scalar_one()


async def delivery_exists(session: AsyncSession, user_id: uuid.UUID, delivery_id: uuid.UUID) -> bool:
    stmt = select(WebhookDelivery.id).where(WebhookDelivery.id == delivery_id, WebhookDelivery.user_id == user_id)
    return (await session.execute(stmt)).scalar_one_or_none() is not None
