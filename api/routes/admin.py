"""Admin endpoints: users (list, search, disable, enable). Every route needs the admin role (403 otherwise)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import AdminUserId, AutocommitSessionDep, HandlesDep
from api.errors import error_responses
from api.routes import V1_PREFIX
from shared.errors import InvalidInput
from shared.models import Role
from shared.schemas import AdminUserOut, AdminUserPage
from shared.services import admin_users

router = APIRouter(prefix=f"{V1_PREFIX}/admin", tags=["admin"])


@router.get("/users", response_model=AdminUserPage, responses=error_responses(401, 403, 422, 503))
async def list_users(
    _: AdminUserId,
    session: AutocommitSessionDep,
    q: Annotated[str | None, Query(max_length=320, description="Part of the email, case-insensitive")] = None,
    role: Role | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> AdminUserPage:
    """Users, oldest first, optionally filtered by email and role; `total` counts every match."""
    if q is not None and "\x00" in q:
        # PostgreSQL text cannot hold U+0000 (and no email contains it).
        message = "q must not contain NUL (U+0000) characters"
        raise InvalidInput(
            message, code="nul_character", details=[{"loc": ["query", "q"], "msg": message, "type": "nul_character"}]
        )
    users, total = await admin_users.search(session, q, role, limit, offset)
    return AdminUserPage(items=[AdminUserOut.model_validate(u) for u in users], total=total, limit=limit, offset=offset)


# Each write commits on its own, before Redis is told (see admin_users.set_disabled).
@router.post(
    "/users/{user_id}/disable", response_model=AdminUserOut, responses=error_responses(401, 403, 404, 409, 422, 503)
)
async def disable_user(
    user_id: uuid.UUID, admin_id: AdminUserId, session: AutocommitSessionDep, handles: HandlesDep
) -> AdminUserOut:
    """Disable an account: its tokens and API keys stop working on every API process at once."""
    return AdminUserOut.model_validate(await admin_users.set_disabled(session, handles.redis, admin_id, user_id, True))


@router.post("/users/{user_id}/enable", response_model=AdminUserOut, responses=error_responses(401, 403, 404, 422, 503))
async def enable_user(
    user_id: uuid.UUID, admin_id: AdminUserId, session: AutocommitSessionDep, handles: HandlesDep
) -> AdminUserOut:
    """Enable an account again: the user logs in anew; their API keys work again."""
    return AdminUserOut.model_validate(await admin_users.set_disabled(session, handles.redis, admin_id, user_id, False))
