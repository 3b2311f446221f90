"""Usage reports, counted from the query rows themselves (deleted queries included: erasing keeps usage)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession

from shared.errors import InvalidInput, NotFound
from shared.repositories import users as users_repo
from shared.repositories.usage import usage_by
from shared.schemas import UsageReport, UsageRow

DEFAULT_PERIOD = timedelta(days=30)
GroupBy = Literal["day", "model"]


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _invalid_period(field: str, msg: str) -> InvalidInput:
    return InvalidInput(
        f"`{field}` {msg}",
        code="invalid_period",
        details=[{"loc": ["query", field], "msg": msg, "type": "invalid_period"}],
    )


async def usage_report(
    session: AsyncSession,
    user_id: uuid.UUID,
    start: datetime | None,
    end: datetime | None,
    group_by: GroupBy,
    *,
    check_user: bool = False,
) -> UsageReport:
    """The user's queries and tokens in [start, end) (default: the last 30 days), grouped by day or model."""
    end = _utc(end) if end is not None else datetime.now(UTC)
    try:
        start = _utc(start) if start is not None else end - DEFAULT_PERIOD
    except OverflowError:
        # `to` within 30 days of year 1: the default `from` cannot be represented.
        raise _invalid_period("from", "must be given when `to` is this early") from None
    if start >= end:
        raise _invalid_period("from", "must be before `to`")
    if check_user and await users_repo.by_id(session, user_id) is None:
        raise NotFound("User not found", code="user_not_found")
    items = [UsageRow.model_validate(dict(row)) for row in await usage_by(session, user_id, start, end, group_by)]
    totals = UsageRow(
        key="total",
        queries=sum(i.queries for i in items),
        prompt_tokens=sum(i.prompt_tokens for i in items),
        completion_tokens=sum(i.completion_tokens for i in items),
        total_tokens=sum(i.total_tokens for i in items),
        cached_tokens=sum(i.cached_tokens for i in items),
        reserved_tokens=sum(i.reserved_tokens for i in items),
    )
    return UsageReport(user_id=user_id, start=start, end=end, group_by=group_by, items=items, totals=totals)
