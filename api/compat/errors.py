"""Errors under `/v1` in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and status codes.

The SDK picks its exception class from the status alone (400 BadRequestError, 401 AuthenticationError,
404 NotFoundError, 429 RateLimitError …) and honours `retry-after-ms`/`retry-after` on 429 and 503.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi.responses import JSONResponse

from shared.schemas_openai import OpenAIErrorBody

COMPAT_PREFIX = "/v1"

_TYPES = {401: "invalid_request_error", 403: "permission_error", 429: "requests"}
# The token budget is a quota, not a request rate: OpenAI says `tokens` for that kind of 429.
_TYPE_BY_CODE = {"token_budget_exceeded": "tokens"}
# OpenAI's own codes where ours name the same thing.
_CODES = {"not_authenticated": "invalid_api_key", "invalid_token": "invalid_api_key", "validation_error": None}
# Parts of a validation error's `loc` that say where, not what.
_LOC_ROOTS = frozenset({"body", "query", "path", "header"})


_DESCRIPTIONS = {
    400: "Invalid request (`invalid_request_error`; `param` names the field): a validation error is a 400 here",
    401: "Missing, invalid, expired or revoked credentials (`invalid_api_key`)",
    403: "Authenticated, but not allowed (an API key without the scope: `insufficient_scope`)",
    404: "Not found (another user's object looks exactly like a missing one)",
    409: "Conflicts with the object's current state",
    413: "Request body too large",
    415: "Unsupported media type",
    429: "A limit refused it (`requests`, or `tokens` for the token budget): retry after `retry-after(-ms)`",
    502: "The query failed upstream (the message carries AIQ's error code)",
    503: "A dependency (database, Redis) is briefly unavailable: retry after `retry-after(-ms)`",
    504: "Not answered within COMPAT_WAIT_SECONDS: the message names the `resp_…` id to retrieve it by",
}


def openai_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries declaring OpenAI's error body for these statuses (`api.errors.error_responses`
    for the native API)."""
    return {status: {"model": OpenAIErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses}


def is_compat_path(path: str) -> bool:
    """True for the OpenAI-compatible routes (`/v1/...`), not the native `/api/v1`."""
    return path == COMPAT_PREFIX or path.startswith(COMPAT_PREFIX + "/")


def _param(details: list[dict[str, Any]] | None) -> str | None:
    for detail in details or ():
        loc = [str(p) for p in detail.get("loc", ()) if str(p) not in _LOC_ROOTS]
        if loc:
            return ".".join(loc)
    return None


def _message(message: str, details: list[dict[str, Any]] | None) -> str:
    # OpenAI's bodies have no `details`: fold the first one into the message, so it still says what is wrong.
    if not details:
        return message
    first = details[0]
    where = _param(details)
    return f"{message}: {where + ': ' if where else ''}{first.get('msg', '')}"


def openai_error_response(
    status_code: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Render one of our errors as OpenAI does: 422 becomes 400 `invalid_request_error`."""
    status = 400 if status_code == 422 else status_code
    kind = "server_error" if status >= 500 else _TYPE_BY_CODE.get(code) or _TYPES.get(status, "invalid_request_error")
    out_headers = dict(headers or {})
    retry_after = next((v for k, v in out_headers.items() if k.lower() == "retry-after"), None)
    if retry_after is not None:
        with contextlib.suppress(ValueError):
            out_headers["retry-after-ms"] = str(int(float(retry_after) * 1000))
    body = {
        "error": {
            "message": _message(message, details),
            "type": kind,
            "param": _param(details),
            "code": _CODES.get(code, code),
        }
    }
    return JSONResponse(body, status_code=status, headers=out_headers)
