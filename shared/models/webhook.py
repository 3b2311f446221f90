"""Webhooks: each account's endpoint and signing secrets, and the outbox of deliveries."""

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookEvent(StrEnum):
    COMPLETED = "query.completed"
    FAILED = "query.failed"
    CANCELLED = "query.cancelled"


class WebhookEndpoint(Base):
    """One row per account: its default endpoint (optional) and its `whsec_` signing secrets.

    The secret is kept readable (not hashed): the sender signs with it and its owner may read it again.
    After a rotation the previous secret also signs until `previous_secret_expires_at`.
    """

    __tablename__ = "webhook_endpoints"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    url: Mapped[str | None] = mapped_column(Text)
    # Set when the receiver answered 410 Gone; a PUT of the endpoint enables it again.
    disabled_at: Mapped[datetime | None]
    disabled_reason: Mapped[str | None] = mapped_column(String(64))
    secret: Mapped[str] = mapped_column(String(100))
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_secret_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())


_DELIVERY_STATUSES = ", ".join(f"'{s.value}'" for s in DeliveryStatus)


class WebhookDelivery(Base):
    """The outbox: written by a trigger in the same transaction as the query's terminal write (migration 0008).

    Its id is the `webhook-id` of every attempt; `payload` is frozen at creation, so retries send the same body.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(f"status IN ({_DELIVERY_STATUSES})", name="status_valid"),
        # The sweeper's scan: due pending deliveries only.
        Index("ix_webhook_deliveries_due", "next_attempt_at", postgresql_where=text("status = 'pending'")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, server_default=func.gen_random_uuid())
    query_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    # Whether `url` is the account's endpoint (a 410 disables it) rather than the query's own `webhook_url`.
    to_endpoint: Mapped[bool] = mapped_column(server_default="false")
    event_type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    attempts: Mapped[int] = mapped_column(server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=func.now())
    # A sending worker's hold on the row, so a duplicate message never sends it twice at once.
    locked_until: Mapped[datetime | None]
    # When a message was last sent for it (the sweeper re-sends only rows without a recent one).
    sent_at: Mapped[datetime | None]
    last_attempt_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    delivered_at: Mapped[datetime | None]
