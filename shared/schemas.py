"""Request and response bodies of the public API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, EmailStr, Field, JsonValue

from shared.models import QueryStatus


class StrictBody(BaseModel):
    # Unknown fields are a client bug worth reporting, not something to drop silently.
    model_config = ConfigDict(extra="forbid")


# Request examples are what Swagger UI's "Try it out" sends: each must succeed as it stands.
_PASSPHRASE_EXAMPLE = "correct horse battery staple, 2026"  # noqa: S105 - a documentation example


class Credentials(StrictBody):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"email": "ada@example.com", "password": _PASSPHRASE_EXAMPLE}]}
    )

    email: EmailStr
    password: str = Field(min_length=1, max_length=1024)


class Registration(StrictBody):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"email": "ada@example.com", "password": _PASSPHRASE_EXAMPLE}]}
    )

    email: EmailStr
    password: str = Field(min_length=8, max_length=1024, description="8+ characters, at most 72 bytes in UTF-8")


class RefreshRequest(StrictBody):
    refresh_token: str = Field(min_length=1, max_length=4096)


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    role: str
    created_at: datetime


class TokenPair(BaseModel):
    access_token: str
    token_type: str = "bearer"  # noqa: S105 - the OAuth2 token type, not a secret
    expires_in: int
    refresh_token: str


class QueryCreate(StrictBody):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "query": "Explain in two sentences what an idempotency key is.",
                    "max_tokens": 200,
                    "metadata": {"ticket": "T-1042"},
                }
            ]
        }
    )

    # No min_length here: an empty and a blank query are both refused as `query_blank` (shared/services).
    query: str = Field(description="The user prompt, not blank; bounded by MAX_QUERY_CHARS")
    model: str | None = Field(default=None, max_length=200, description="Defaults to DEFAULT_MODEL")
    system: str | None = Field(default=None, description="Optional system prompt; bounded by MAX_QUERY_CHARS")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1)
    metadata: dict[str, JsonValue] | None = Field(default=None, description="Opaque client data, echoed back")


class QueryAccepted(BaseModel):
    query_id: uuid.UUID
    status: QueryStatus
    model: str
    created_at: datetime


class Usage(BaseModel):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class QueryError(BaseModel):
    code: str
    message: str


class QueryOut(BaseModel):
    query_id: uuid.UUID
    status: QueryStatus
    query: str
    system: str | None
    model: str
    temperature: float | None
    max_tokens: int | None
    metadata: dict[str, Any] | None
    response: str | None
    error: QueryError | None
    usage: Usage | None = Field(description="Token counts once the model answered; null until then and when it did not")
    attempts: int
    cancel_requested: bool = Field(description="A cancel was asked for; a running query ends cancelled shortly")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class QueryPage(BaseModel):
    items: list[QueryOut]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null on the last page")


class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(description="Where the problem is, e.g. ['body', 'query']")
    msg: str
    type: str


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `query_not_found`")
    message: str = Field(description="What went wrong, for humans")
    details: list[ErrorDetail] | None = None


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer has this shape."""

    error: ErrorInfo
