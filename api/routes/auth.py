"""Register, login, refresh, logout (this session or all), password change, me."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from api.deps import (
    AutocommitSessionDep,
    CurrentUserId,
    HandlesDep,
    SessionDep,
    SessionPrincipal,
    SessionUserId,
)
from api.errors import error_responses
from api.routes import V1_PREFIX
from api.throttle import LoginThrottle, RegisterThrottle, mark_login_succeeded, request_address
from shared.errors import AppError, InvalidInput, NotFound, Unauthorized
from shared.limits import limiter_for
from shared.repositories import users as users_repo
from shared.schemas import (
    Credentials,
    LogoutRequest,
    PasswordChange,
    RefreshRequest,
    Registration,
    TokenPair,
    UserOut,
)
from shared.services import auth

router = APIRouter(prefix=V1_PREFIX, tags=["auth"])
# RFC 6749 §5.1: token responses must not be cached by the client or anything in between.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")

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


@router.post(
    "/auth/register",
    status_code=status.HTTP_201_CREATED,
    response_model=UserOut,
    responses=error_responses(409, 422, 429, 503),
)
async def register(body: Registration, session: SessionDep, handles: HandlesDep, _: RegisterThrottle) -> UserOut:
    """Create an account."""
    user = await auth.register(session, handles.settings, body.email, body.password)
    return UserOut.model_validate(user)


def _is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() in _FORM_TYPES


async def _read_credentials(request: Request) -> Credentials:
    """Accept the OAuth2 password form (Swagger's Authorize button) and JSON alike."""
    raw: Any
    if _is_form(request):
        form = await request.form()
        raw = {"email": form.get("username"), "password": form.get("password")}
    else:
        try:
            raw = json.loads(await request.body() or b"null")
        except (ValueError, RecursionError) as exc:
            # RecursionError: a body nested ~1,000 deep exhausts the parser's stack; still the client's fault.
            raise InvalidInput("Request body is not valid JSON", code="malformed_json") from exc
    try:
        return Credentials.model_validate(raw)
    except ValidationError as exc:
        details = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise InvalidInput("Request is invalid", details=details) from exc


def _oauth2_error(exc: AppError) -> JSONResponse:
    """RFC 6749 §5.2's error body, which OAuth2 clients (Swagger's Authorize dialog) understand."""
    error = "invalid_grant" if exc.status_code == status.HTTP_401_UNAUTHORIZED else "invalid_request"
    return JSONResponse({"error": error, "error_description": exc.message}, status_code=400, headers=NO_STORE)


_OAUTH2_ERROR = {
    "description": "OAuth2 form only (RFC 6749 §5.2): `invalid_grant` for wrong credentials, "
    "`invalid_request` for a malformed form. JSON logins get AIQ's error body instead.",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
            }
        }
    },
}


@router.post(
    "/auth/login",
    response_model=TokenPair,
    openapi_extra={"requestBody": _LOGIN_BODY},
    responses={400: _OAUTH2_ERROR, **error_responses(401, 403, 422, 429, 503)},
)
async def login(
    request: Request, response: Response, session: SessionDep, handles: HandlesDep, _: LoginThrottle
) -> Any:
    """Exchange email and password for an access and a refresh token."""
    settings = handles.settings
    try:
        creds = await _read_credentials(request)
        user = await auth.authenticate(session, settings, creds.email, creds.password)
    except (Unauthorized, InvalidInput) as exc:
        if _is_form(request):
            return _oauth2_error(exc)
        raise
    response.headers.update(NO_STORE)
    pair = await auth.issue_pair(session, settings, user.id)
    mark_login_succeeded(request)
    return pair


@router.post("/auth/refresh", response_model=TokenPair, responses=error_responses(401, 422, 503))
async def refresh(
    body: RefreshRequest,
    response: Response,
    session: SessionDep,
    handles: HandlesDep,
) -> TokenPair:
    """Trade a refresh token for a new pair; the old refresh token stops working."""
    response.headers.update(NO_STORE)
    try:
        return await auth.refresh(session, handles.settings, handles.redis, handles.pool, body.refresh_token)
    except auth.RefreshTokenReused:
        # The one commit a route makes itself: the request fails (and SessionDep rolls back what is left),
        # but the revocation of the family must stick.
        await session.commit()
        raise


@router.post(
    "/auth/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(401, 403, 422, 503),
)
async def logout(
    principal: SessionPrincipal,
    session: SessionDep,
    handles: HandlesDep,
    body: Annotated[LogoutRequest | None, Body()] = None,
) -> Response:
    """Revoke this access token at once, and its refresh family (plus that of `refresh_token`, if given)."""
    assert principal.token is not None  # SessionPrincipal is an access token
    refresh_token = body.refresh_token if body else None
    await auth.logout(session, handles.settings, handles.redis, principal.token, refresh_token)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/auth/logout-all",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(401, 403, 503),
)
async def logout_all(user_id: SessionUserId, session: SessionDep, handles: HandlesDep) -> Response:
    """Log out everywhere: every access token issued until now (this one too) and every refresh token of yours
    stop working at once, on every API process. API keys are separate credentials and keep working."""
    await auth.logout_everywhere(session, handles.settings, handles.redis, user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/auth/password", response_model=TokenPair, responses=error_responses(400, 401, 403, 422, 429, 503))
async def change_password(
    body: PasswordChange,
    request: Request,
    response: Response,
    user_id: SessionUserId,
    session: SessionDep,
    handles: HandlesDep,
) -> TokenPair:
    """Change your password: 400 `invalid_current_password` for a wrong current one (throttled like logins).
    Every session ends as with logout-all; the new pair returned keeps you logged in here. API keys stay valid."""
    response.headers.update(NO_STORE)
    settings = handles.settings
    return await auth.change_password(
        session,
        settings,
        handles.redis,
        limiter_for(handles.redis, settings),
        request_address(request, settings),
        user_id,
        body.current_password,
        body.new_password,
    )


@router.get("/users/me", response_model=UserOut, tags=["users"], responses=error_responses(401, 403, 404, 503))
async def me(user_id: CurrentUserId, session: AutocommitSessionDep) -> UserOut:
    """The authenticated user."""
    user = await users_repo.by_id(session, user_id)
    if user is None:
        raise NotFound("User not found", code="user_not_found")
    return UserOut.model_validate(user)
