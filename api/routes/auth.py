"""Register, login, refresh, logout, me."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, status
from pydantic import ValidationError

from api.deps import CurrentUserId, ReadSessionDep, SessionDep, SettingsDep
from api.throttle import LoginThrottle, RegisterThrottle
from shared.errors import InvalidInput, NotFound
from shared.repositories import users as users_repo
from shared.schemas import Credentials, RefreshRequest, Registration, TokenPair, UserOut
from shared.services import auth

router = APIRouter(tags=["auth"])

_LOGIN_BODY = {
    "content": {
        "application/x-www-form-urlencoded": {
            "schema": {
                "type": "object",
                "required": ["username", "password"],
                "properties": {
                    "username": {"type": "string", "description": "Your email"},
                    "password": {"type": "string", "format": "password"},
                },
            }
        },
        "application/json": {"schema": Credentials.model_json_schema()},
    },
    "required": True,
}


@router.post("/auth/register", status_code=status.HTTP_201_CREATED, response_model=UserOut)
async def register(body: Registration, session: SessionDep, settings: SettingsDep, _: RegisterThrottle) -> UserOut:
    """Create an account."""
    user = await auth.register(session, settings, body.email, body.password)
    return UserOut.model_validate(user)


async def _read_credentials(request: Request) -> Credentials:
    """Accept the OAuth2 password form (Swagger's Authorize button) and JSON alike."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw: Any
    if content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.form()
        raw = {"email": form.get("username"), "password": form.get("password")}
    else:
        try:
            raw = json.loads(await request.body() or b"null")
        except ValueError as exc:
            raise InvalidInput("Request body is not valid JSON", code="malformed_json") from exc
    try:
        return Credentials.model_validate(raw)
    except ValidationError as exc:
        details = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise InvalidInput("Request is invalid", details=details) from exc


@router.post("/auth/login", response_model=TokenPair, openapi_extra={"requestBody": _LOGIN_BODY})
async def login(request: Request, session: SessionDep, settings: SettingsDep, _: LoginThrottle) -> TokenPair:
    """Exchange email and password for an access and a refresh token."""
    creds = await _read_credentials(request)
    user = await auth.authenticate(session, settings, creds.email, creds.password)
    return await auth.issue_pair(session, settings, user.id)


@router.post("/auth/refresh", response_model=TokenPair)
async def refresh(body: RefreshRequest, session: SessionDep, settings: SettingsDep) -> TokenPair:
    """Trade a refresh token for a new pair; the old refresh token stops working."""
    try:
        return await auth.refresh(session, settings, body.refresh_token)
    except auth.RefreshTokenReused:
        # The one commit a route makes itself: the request fails (and SessionDep rolls back what is left),
        # but the revocation of the whole family must stick.
        await session.commit()
        raise


@router.post("/auth/logout", status_code=status.HTTP_204_NO_CONTENT)
async def logout(
    user_id: CurrentUserId,
    session: SessionDep,
    settings: SettingsDep,
    body: Annotated[RefreshRequest, Body()],
) -> None:
    """Revoke a refresh token. Access tokens stay valid until they expire (ACCESS_TOKEN_TTL_SECONDS)."""
    await auth.logout(session, settings, user_id, body.refresh_token)


@router.get("/users/me", response_model=UserOut, tags=["users"])
async def me(user_id: CurrentUserId, session: ReadSessionDep) -> UserOut:
    """The authenticated user."""
    user = await users_repo.by_id(session, user_id)
    if user is None:
        raise NotFound("User not found", code="user_not_found")
    return UserOut.model_validate(user)
