"""Request and response bodies of the public API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    JsonValue,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
)
from pydantic_core import PydanticCustomError

from shared.models import QueryStatus


class StrictBody(BaseModel):
    """A request body. Unknown fields are a client bug worth reporting, not something to drop silently; so is a
    boolean sent as a string or a number (`"yes"`, `"false"`, `0`), or a number sent as a string or a boolean
    (`"0.5"`, `false`): its fields are `StrictBool`, `StrictInt` and `StrictFloat`, JSON's own types (an integer
    is a number too; `10.0` is not an integer)."""

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
    password: str = Field(
        min_length=1,
        max_length=1024,
        description="At least PASSWORD_MIN_LENGTH (8) characters, at most 72 bytes in UTF-8, not a common password",
        examples=["correct horse battery staple"],
    )


class PasswordChange(StrictBody):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"current_password": _PASSPHRASE_EXAMPLE, "new_password": "a longer passphrase, 2027"}]
        }
    )

    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(
        min_length=1,
        max_length=1024,
        description="The registration rules, and not the current password",
    )


class RefreshRequest(StrictBody):
    refresh_token: str = Field(min_length=1, max_length=4096)


class LogoutRequest(StrictBody):
    refresh_token: str | None = Field(
        default=None, min_length=1, max_length=4096, description="Optional: its family is revoked too"
    )


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


ApiKeyScope = Literal["queries:read", "queries:write"]


class ApiKeyCreate(StrictBody):
    name: str = Field(min_length=1, max_length=100, examples=["nightly batch"])
    scopes: list[ApiKeyScope] = Field(
        default=["queries:read", "queries:write"],
        min_length=1,
        max_length=2,
        description="`queries:read` for GET routes, `queries:write` for submit and cancel",
    )

    @field_validator("name")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        # PostgreSQL text cannot hold U+0000.
        if "\x00" in value:
            raise PydanticCustomError("nul_character", "name must not contain NUL (U+0000) characters")
        return value


class ApiKeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    prefix: str = Field(description="The key's first characters, to recognise it; never the whole key")
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None = Field(description="Updated at most once a minute")


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The secret: shown this once, send it as `Authorization: Bearer <key>`")


class AdminUserOut(UserOut):
    disabled_at: datetime | None


class AdminUserPage(BaseModel):
    items: list[AdminUserOut]
    total: int
    limit: int
    offset: int


def _is_text(value: object) -> bool:
    """No lone surrogates (JSON's `"\\ud800"` parses, but no UTF-8 encoder or PostgreSQL takes it)."""
    if isinstance(value, str):
        if value.isascii():
            return True
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_is_text(k) and _is_text(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_text(v) for v in value)
    return True


def _text_only(value: Any) -> Any:
    """A field validator's check: the value as it is, or pydantic's `invalid_unicode` error (`_is_text`)."""
    if not _is_text(value):
        raise PydanticCustomError("invalid_unicode", "Text must be valid Unicode (no lone surrogates)")
    return value


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
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    metadata: dict[str, JsonValue] | None = Field(default=None, description="Opaque client data, echoed back")
    priority: Literal["interactive", "batch"] = Field(
        default="interactive",
        description="`batch` runs only on the upstream budget interactive work leaves (aged, so never starved)",
    )
    cache: StrictBool | None = Field(
        default=None,
        description="Answer from the response cache when an identical request (model, system, query, temperature, "
        "max_tokens) was answered before, and cache this answer; null: the server's RESPONSE_CACHE_DEFAULT",
    )
    webhook_url: str | None = Field(
        default=None,
        max_length=2048,
        description="POST a signed `query.completed|failed|cancelled` event here when the query ends (instead of "
        "the account's endpoint); https only in production, public addresses only",
        examples=["https://example.com/hooks/aiq"],
    )

    # Unconstrained strings skip pydantic's own UTF-8 check; the others get it (`string_unicode`).
    _valid_unicode = field_validator("query", "system", "metadata")(_text_only)


class Turn(BaseModel):
    """One earlier turn of a `/v1` conversation."""

    role: Literal["user", "assistant"]
    content: str
    name: str | None = Field(default=None, max_length=64, description="The participant's name, when given")

    _valid_unicode = field_validator("content", "name")(_text_only)


class ConversationCreate(QueryCreate):
    """A `/v1` conversation as a submission: `query` is its final user message and `history` the turns before
    it, which the model receives as messages of their own. Not a body of the native API, which takes one prompt.
    """

    history: list[Turn] | None = Field(default=None, description="The turns before `query`, oldest first")
    prompt_name: str | None = Field(default=None, max_length=64, description="The participant name of `query`")

    _valid_name = field_validator("prompt_name")(_text_only)


class QueryAccepted(BaseModel):
    query_id: uuid.UUID
    status: QueryStatus = Field(
        description=(
            "`pending`, or `completed` when answered from the response cache; after a `Prefer: wait` that ran "
            "out, the status then (`pending` or `running`)"
        )
    )
    model: str
    created_at: datetime
    cached: bool = Field(default=False, description="Answered from the response cache: already completed")


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
    priority: Literal["interactive", "batch"]
    response: str | None
    error: QueryError | None
    usage: Usage | None = Field(description="Token counts once the model answered; null until then and when it did not")
    cached: bool = Field(description="Answered from the response cache at submit, without a provider call")
    # The `/v1` door's (OpenAI's `background` of a response); not part of the native view.
    background: bool = Field(default=False, exclude=True)
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


class LimitsIn(StrictBody):
    """A user's overrides; null means "the default" (Settings), 0 switches the limit off for this user."""

    requests_per_minute: StrictInt | None = Field(default=None, ge=0, le=1_000_000, examples=[120])
    max_pending: StrictInt | None = Field(default=None, ge=0, le=1_000_000, examples=[50])
    # The override columns are 32-bit integers (migration 0005).
    token_budget: StrictInt | None = Field(default=None, ge=0, le=10**12, examples=[5_000_000])
    # Flow control: this user's weight in fair turns (null: 1), and the largest share of a model's calls in
    # flight the user may hold while other users wait (null: no cap).
    fair_weight: StrictInt | None = Field(default=None, ge=1, le=1000, examples=[2])
    max_share: StrictFloat | None = Field(default=None, gt=0, le=1, examples=[0.5])


class LimitsOut(BaseModel):
    """The limits in force for a user (overrides applied) and the overrides themselves."""

    user_id: uuid.UUID
    requests_per_minute: int
    max_pending: int
    token_budget: int
    token_window_seconds: int
    fair_weight: int
    max_share: float | None
    overrides: LimitsIn


class UsageRow(BaseModel):
    """One group: a UTC day (`2026-11-29`) or a model name."""

    key: str
    queries: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int = Field(
        description="Tokens of the answers, as the provider reported them (answers from the cache included)"
    )
    cached_tokens: int = Field(
        description="The part of total_tokens answered from the response cache: no provider call, no budget"
    )
    reserved_tokens: int = Field(description="Tokens held against the budget at submit (estimate + output cap)")


class UsageReport(BaseModel):
    user_id: uuid.UUID
    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")
    group_by: str
    items: list[UsageRow]
    totals: UsageRow

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class WebhookEndpointIn(StrictBody):
    url: str = Field(max_length=2048, description="https only in production; public addresses only")


class WebhookEndpointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    url: str
    enabled: bool = Field(description="False once the receiver answered 410 Gone; PUT the endpoint to enable it")
    disabled_at: datetime | None
    disabled_reason: str | None
    updated_at: datetime


class WebhookSecretOut(BaseModel):
    secret: str = Field(description="`whsec_` + base64 key: verify `webhook-signature` with it (Standard Webhooks)")
    previous_secret_expires_at: datetime | None = Field(
        description="After a rotation the previous secret also signs (a second signature) until then"
    )


class WebhookDeliveryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID = Field(description="The `webhook-id` header of every attempt")
    query_id: uuid.UUID
    event_type: str
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime | None = Field(description="When a pending delivery is tried next")
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
