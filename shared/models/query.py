import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base


class QueryPriority(StrEnum):
    """Batch work uses only the budget interactive work leaves (aged so it never starves)."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


class QueryStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({QueryStatus.COMPLETED, QueryStatus.FAILED, QueryStatus.CANCELLED})
_STATUS_VALUES = ", ".join(f"'{s.value}'" for s in QueryStatus)


class Query(Base):
    __tablename__ = "queries"
    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUS_VALUES})", name="status_valid"),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        CheckConstraint("priority IN ('interactive', 'batch')", name="priority_valid"),
        # The caller's list, newest first, with a stable tie-break for cursors.
        Index("ix_queries_user_created", "user_id", text("created_at DESC"), text("id DESC")),
        # The sweeper only ever looks at live rows.
        Index(
            "ix_queries_live",
            "status",
            "next_attempt_at",
            postgresql_where=text("status IN ('pending', 'running')"),
        ),
        # Usage per user and period as an index-only scan: the sums' columns ride along in the index.
        Index(
            "ix_queries_user_usage",
            "user_id",
            "created_at",
            postgresql_include=[
                "model",
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
                "reserved_tokens",
                "cached",
            ],
        ),
        # The fair claim (flow control): per model, the due pending rows of each user in due order.
        Index(
            "ix_queries_fair",
            "model",
            "user_id",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
        # Retention purge: terminal rows by age.
        Index("ix_queries_finished", "finished_at", postgresql_where=text("finished_at IS NOT NULL")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    prompt: Mapped[str] = mapped_column(Text)
    system: Mapped[str | None] = mapped_column(Text)
    # A `/v1` conversation's turns before its final user message (`prompt`), in order: `[{"role": "user" |
    # "assistant", "content": str, "name"?: str}, ...]`; NULL for a single message and for every native query.
    history: Mapped[list[dict[str, str]] | None] = mapped_column(JSONB)
    # The final user message's participant `name` (a `/v1` chat message's), when it has one.
    prompt_name: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    temperature: Mapped[float | None]
    max_tokens: Mapped[int | None]
    # `metadata` is reserved on declarative classes, hence the attribute name.
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB)
    # Where to POST the signed `query.*` event when the query ends (else the account's endpoint, if any).
    webhook_url: Mapped[str | None] = mapped_column(Text)

    status: Mapped[str] = mapped_column(String(16), default=QueryStatus.PENDING, server_default="pending")
    priority: Mapped[str] = mapped_column(Text, default=QueryPriority.INTERACTIVE, server_default="interactive")
    response: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    total_tokens: Mapped[int | None]
    # Tokens held against the user's budget at submit (prompt estimate + output cap); kept for usage reports.
    reserved_tokens: Mapped[int | None]
    # Answered from the response cache at submit: no provider call, no worker, no token budget.
    cached: Mapped[bool] = mapped_column(default=False, server_default=text("false"))
    # Created by `POST /v1/responses` with `background: true`: OpenAI's field, echoed on every read of it.
    background: Mapped[bool] = mapped_column(default=False, server_default=text("false"))

    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=func.now())
    lease_expires_at: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    llm_latency_ms: Mapped[int | None]
    # Set when a client cancels a running query; the worker that owns it ends it as cancelled.
    cancel_requested_at: Mapped[datetime | None]

    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Set by `DELETE /api/v1/query/{id}`: prompt, system, history, answer and metadata are erased; usage stays.
    deleted_at: Mapped[datetime | None]


class IdempotencyKey(Base):
    """A replayable `POST /api/v1/query` response, per user and `Idempotency-Key`."""

    __tablename__ = "idempotency_keys"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    query_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"))
    response: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(index=True)
