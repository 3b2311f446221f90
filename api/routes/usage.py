"""Usage: the caller's queries and tokens; admins may ask about any user."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, status
from fastapi.responses import Response
from pydantic import BeforeValidator

from api.deps import (
    AutocommitSessionDep,
    HandlesDep,
    ScopedPrincipal,
    SessionDep,
    SessionUserId,
    admin_user_id,
    session_principal,
    session_user_id,
)
from api.errors import error_responses
from api.routes import V1_PREFIX
from shared.cache import response_cache_for
from shared.limits import limiter_for
from shared.schemas import UsageReport
from shared.services import accounts
from shared.services.usage import GroupBy, usage_report

router = APIRouter(prefix=V1_PREFIX, tags=["usage"])


def _iso_only(value: object) -> object:
    # pydantic reads a bare number as Unix seconds; the document says ISO 8601 (`format: date-time`), so say so.
    if isinstance(value, str) and value.strip().lstrip("+-").replace(".", "", 1).isdigit():
        raise ValueError("must be an ISO 8601 date-time, e.g. 2026-11-01T00:00:00Z")
    return value


# An instant in a query parameter: ISO 8601 only.
Instant = Annotated[datetime, BeforeValidator(_iso_only)]


@router.get("/usage", response_model=UsageReport, responses=error_responses(401, 403, 404, 422))
async def usage(
    principal: ScopedPrincipal,
    session: AutocommitSessionDep,
    start: Annotated[Instant | None, Query(alias="from", description="Inclusive; default: `to` - 30 days")] = None,
    end: Annotated[Instant | None, Query(alias="to", description="Exclusive; default: now")] = None,
    group_by: GroupBy = "day",
    of_user: Annotated[uuid.UUID | None, Query(alias="user_id", description="Admins only: another user")] = None,
) -> UsageReport:
    """Queries and tokens (prompt, completion, total; reserved vs used) per UTC day or per model.

    Another user's (`user_id`) needs the admin role and an access token, not an API key."""
    user_id = principal.user_id
    if of_user is not None and of_user != user_id:
        # Admin work: the same checks as every admin route's `AdminUserId` (an access token, the admin role).
        await admin_user_id(await session_user_id(await session_principal(principal)), session)
        return await usage_report(session, of_user, start, end, group_by, check_user=True)
    return await usage_report(session, user_id, start, end, group_by)


@router.delete(
    "/users/me", status_code=status.HTTP_204_NO_CONTENT, tags=["users"], responses=error_responses(401, 403, 404, 503)
)
async def delete_me(user_id: SessionUserId, session: SessionDep, handles: HandlesDep) -> Response:
    """Delete your account and erase all its queries. Irreversible; an access token only, never an API key."""
    settings, redis = handles.settings, handles.redis
    limiter, cache = limiter_for(redis, settings), response_cache_for(redis, settings)
    await accounts.delete_account(session, settings, limiter, handles.events, cache, user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
