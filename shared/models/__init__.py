"""Every model, re-exported: API, worker and migrations import from here."""

from shared.models.api_key import ApiKey
from shared.models.base import Base
from shared.models.files import (
    BATCH_LIVE_STATUSES,
    FILE_CHUNK_BYTES,
    Batch,
    BatchItem,
    BatchStatus,
    File,
    FileChunk,
    FilePurpose,
)
from shared.models.limits import FairTurn, UserLimits
from shared.models.query import TERMINAL_STATUSES, IdempotencyKey, Query, QueryPriority, QueryStatus
from shared.models.user import RefreshToken, RevokedReason, Role, User
from shared.models.webhook import DeliveryStatus, WebhookDelivery, WebhookEndpoint, WebhookEvent

__all__ = [
    "BATCH_LIVE_STATUSES",
    "FILE_CHUNK_BYTES",
    "TERMINAL_STATUSES",
    "ApiKey",
    "Base",
    "Batch",
    "BatchItem",
    "BatchStatus",
    "DeliveryStatus",
    "FairTurn",
    "File",
    "FileChunk",
    "FilePurpose",
    "IdempotencyKey",
    "Query",
    "QueryPriority",
    "QueryStatus",
    "RefreshToken",
    "RevokedReason",
    "Role",
    "User",
    "UserLimits",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookEvent",
]
