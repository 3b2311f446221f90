"""What both handles' query SQL shares: the public columns and the values of a cancelled row."""

from __future__ import annotations

from typing import Any, Protocol

from shared.models import Query


class RowLike(Protocol):
    """A row read by key: SQLAlchemy's RowMapping or asyncpg's Record."""

    def __getitem__(self, key: str) -> Any: ...


# What the API shows of a row. Plain column rows, not ORM entities: reads are the hottest path.
PUBLIC_COLUMNS = (
    Query.id,
    Query.prompt,
    Query.system,
    Query.model,
    Query.temperature,
    Query.max_tokens,
    Query.meta.label("meta"),
    Query.priority,
    Query.status,
    Query.response,
    Query.error_code,
    Query.error_message,
    Query.prompt_tokens,
    Query.completion_tokens,
    Query.total_tokens,
    Query.cached,
    Query.background,
    Query.attempts,
    Query.cancel_requested_at,
    Query.created_at,
    Query.started_at,
    Query.finished_at,
)

CANCEL_REQUESTED = Query.cancel_requested_at.is_not(None)
CANCELLED_CODE, CANCELLED_MESSAGE = "cancelled", "Cancelled by the client"
