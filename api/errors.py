"""One JSON error shape for every 4xx/5xx: `{"error": {"code", "message", "details"?}}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from api.compat.errors import is_compat_path, openai_error_response
from shared.db import DATABASE_UNAVAILABLE, database_unavailable
from shared.errors import AppError
from shared.schemas import ErrorBody

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


_DESCRIPTIONS = {
    400: "Bad request",
    401: "Missing, invalid, expired or revoked credentials",
    403: "Authenticated, but not allowed",
    404: "Not found (another user's resource looks exactly like a missing one)",
    409: "Conflicts with the current state",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Invalid input",
    429: "Too many requests: wait for Retry-After",
    503: "A dependency (database, broker) is briefly unavailable: retry after Retry-After",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries declaring the JSON error body for these statuses."""
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses}


def error_response(
    status_code: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    *,
    path: str = "",
) -> JSONResponse:
    """The error body; under the OpenAI-compatible `/v1` door, in OpenAI's shape and status codes instead."""
    if is_compat_path(path):
        return openai_error_response(status_code, code, message, details, headers)
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status_code, headers=headers)


# Pydantic messages of these types quote the input (a UUID parser names the bad character, an email
# validator the bad part): say what was expected instead.
_FIXED_MESSAGES = {
    "uuid_parsing": "Input should be a valid UUID",
    "uuid_type": "Input should be a valid UUID",
    "uuid_version": "Input should be a valid UUID",
    "value_error": "Value is not valid",
    "assertion_error": "Value is not valid",
    "json_invalid": "Request body is not valid JSON",
}
# Object keys the client chose (an unknown field, a metadata key) can appear in `loc`: bounded, not dropped.
_MAX_LOC_PART = 64


def _loc_part(part: Any) -> str | int:
    if isinstance(part, int):
        return part
    text = str(part)
    return text if len(text) <= _MAX_LOC_PART else text[: _MAX_LOC_PART - 1] + "…"


def safe_message(error_type: str, msg: str, value: Any) -> str:
    """A validation message that never echoes the client's input."""
    if error_type in _FIXED_MESSAGES:
        return _FIXED_MESSAGES[error_type]
    quotable = isinstance(value, str | int | float) and not isinstance(value, bool) and len(str(value)) >= 3
    if quotable and str(value) in msg:
        return "Value is not valid"
    return msg


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    # `input` and `ctx` can echo the request body (passwords, prompts): leave them out, and the message too
    # where it quotes the input.
    return [
        {
            "loc": [_loc_part(p) for p in e.get("loc", ())],
            "msg": safe_message(str(e.get("type", "")), str(e.get("msg", "")), e.get("input")),
            "type": e.get("type", ""),
        }
        for e in exc.errors()
    ]


async def _app_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers, path=request.url.path)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = _validation_details(exc)
    malformed = any(d["type"] == "json_invalid" for d in details)
    code, message = (
        ("malformed_json", "Request body is not valid JSON")
        if malformed
        else ("validation_error", "Request is invalid")
    )
    return error_response(422, code, message, details, path=request.url.path)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (RFC 9110 `Allow`). Starlette's 405 names only the methods of
    the first route the path matched, and each method of a path is a route of its own here."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, BaseRoute) and route.matches(request.scope)[0] is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error" if exc.status_code < 500 else "internal_error")
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": _allowed_methods(request)}
    return error_response(exc.status_code, code, str(exc.detail), headers=headers, path=request.url.path)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if not database_unavailable(exc):
        return await _unhandled(request, exc)
    # An outage, not a bug: say so, and when to come back. Clients retry safely with an Idempotency-Key.
    log.warning("database unavailable", extra={"error": type(exc).__name__})
    return error_response(
        503,
        "database_unavailable",
        "The database is unavailable; retry shortly",
        headers={"Retry-After": "2"},
        path=request.url.path,
    )


def internal_error(exc: BaseException) -> JSONResponse:
    """Log a bug (its type only, see shared/logging.py) and answer the JSON 500."""
    log.error("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "Internal server error")


async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
    return internal_error(exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for unavailable in (*DATABASE_UNAVAILABLE, DBAPIError):
        app.add_exception_handler(unavailable, _database_error)
    app.add_exception_handler(Exception, _unhandled)
