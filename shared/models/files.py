"""Files (`/v1/files`) and Batches (`/v1/batches`) of the OpenAI-compatible door.

A file's content lives in PostgreSQL as ordered 1 MiB `bytea` chunk rows: durable and backed up with the
rest of the data, no shared volume or object store for every API and worker pod to reach, and an upload or
a download streams one chunk at a time. A batch's lines become ordinary query rows; `batch_items` ties each
line (its `custom_id`) to its query, or records why the line was refused.
"""

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, LargeBinary, String, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base

FILE_CHUNK_BYTES = 1024 * 1024


class FilePurpose(StrEnum):
    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


BATCH_LIVE_STATUSES = frozenset(
    {BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.CANCELLING}
)
_PURPOSES = ", ".join(f"'{p.value}'" for p in FilePurpose)
_BATCH_STATUSES = ", ".join(f"'{s.value}'" for s in BatchStatus)
_LIVE = ", ".join(f"'{s.value}'" for s in sorted(BATCH_LIVE_STATUSES))


class File(Base):
    __tablename__ = "files"
    __table_args__ = (
        CheckConstraint(f"purpose IN ({_PURPOSES})", name="purpose_valid"),
        Index("ix_files_user_created", "user_id", text("created_at DESC")),
        # The workers' sweep deletes expired files, oldest expiry first.
        Index("ix_files_expires_at", "expires_at", postgresql_where=text("expires_at IS NOT NULL")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    # Non-blank lines: the requests of a batch input file.
    line_count: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    # OpenAI's `expires_at`: past it the file reads as missing and the workers' sweep deletes it; null: kept
    # until deleted. From the upload's `expires_after`, or BATCH_OUTPUT_EXPIRES_SECONDS for a batch's output.
    expires_at: Mapped[datetime | None]


class FileChunk(Base):
    """One piece of a file's content, in order (`seq` from 0); at most FILE_CHUNK_BYTES."""

    __tablename__ = "file_chunks"

    file_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        CheckConstraint(f"status IN ({_BATCH_STATUSES})", name="status_valid"),
        Index("ix_batches_user_created", "user_id", text("created_at DESC"), text("id DESC")),
        # The sweeper looks for live batches whose next step is overdue.
        Index("ix_batches_live", "next_check_at", postgresql_where=text(f"status IN ({_LIVE})")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # No foreign key: a finished batch keeps naming its input file after the file is deleted (as OpenAI's do);
    # a live batch's file cannot be deleted (`DELETE /v1/files/{id}` is a 409 then).
    input_file_id: Mapped[uuid.UUID]
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    # `metadata` is reserved on declarative classes, hence the attribute name.
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB)
    # Batch-level errors (OpenAI's `errors.data`), e.g. an unreadable input file.
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    output_file_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("files.id", ondelete="SET NULL"))
    error_file_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("files.id", ondelete="SET NULL"))
    request_total: Mapped[int] = mapped_column(default=0, server_default="0")
    request_completed: Mapped[int] = mapped_column(default=0, server_default="0")
    request_failed: Mapped[int] = mapped_column(default=0, server_default="0")
    # Where expansion resumes in the input file: the chunk and byte offset of the next unread line, its number.
    read_chunk: Mapped[int] = mapped_column(default=0, server_default="0")
    read_offset: Mapped[int] = mapped_column(default=0, server_default="0")
    lines_read: Mapped[int] = mapped_column(default=0, server_default="0")
    input_done: Mapped[bool] = mapped_column(default=False, server_default="false")
    next_check_at: Mapped[datetime] = mapped_column(server_default=func.now())
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime]
    # `output_expires_after.seconds` of the create: its output and error files expire this long after they are
    # written (null: BATCH_OUTPUT_EXPIRES_SECONDS).
    output_expires_seconds: Mapped[int | None]
    in_progress_at: Mapped[datetime | None]
    finalizing_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]
    cancelling_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]


class BatchItem(Base):
    """One line of a batch's input file: its query, or the reason it was refused."""

    __tablename__ = "batch_items"
    __table_args__ = (Index("ix_batch_items_query_id", "query_id"),)

    batch_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    line_no: Mapped[int] = mapped_column(primary_key=True)
    custom_id: Mapped[str | None] = mapped_column(Text)
    query_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("queries.id", ondelete="SET NULL"))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
