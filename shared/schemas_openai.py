"""Request bodies of the OpenAI-compatible door (`/v1`), as OpenAI's API reference names their fields, and its
error body (`OpenAIErrorBody`, as `api/compat/errors.py` renders it).

Only what AIQ can honour is accepted: an unknown field (tools, response_format …) is a 400 that names it,
never silently dropped; a boolean is JSON's `true`/`false` (`StrictBool`: `"true"` or `1` is a 400, as the
SDK only sends real booleans). A batch line's `body` is parsed with the same models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator
from pydantic_core import PydanticCustomError

# OpenAI: at most 16 pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Body):
    type: Literal["text", "input_text", "output_text"]
    text: str
    # Output text as the SDK echoes it back from an earlier response.
    annotations: list[Any] | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(default=None, max_length=64)


class StreamOptions(_Body):
    include_usage: StrictBool = False


class ChatCompletionCreate(_Body):
    """`POST /v1/chat/completions`."""

    model: str = Field(max_length=200, description="One of `GET /v1/models` (ALLOWED_MODELS)")
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    metadata: Metadata | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = None
    user: str | None = Field(default=None, max_length=256)
    store: StrictBool | None = None


class InputMessage(_Body):
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    # Present when the SDK sends back an output message of an earlier response.
    id: str | None = None
    status: str | None = None


class ResponseCreate(_Body):
    """`POST /v1/responses`."""

    # Swagger UI's "Try it out" sends this as it stands: a background response, answered at once.
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"input": "Explain in two sentences what a job queue is.", "background": True}]}
    )

    model: str | None = Field(
        default=None, max_length=200, description="One of `GET /v1/models` (ALLOWED_MODELS); defaults to DEFAULT_MODEL"
    )
    input: str | list[InputMessage]
    instructions: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_output_tokens: int | None = Field(default=None, ge=1)
    metadata: Metadata | None = None
    background: StrictBool | None = False
    stream: StrictBool | None = False
    store: StrictBool | None = None
    user: str | None = Field(default=None, max_length=256)

    @field_validator("store")
    @classmethod
    def _stored(cls, value: bool | None) -> bool | None:
        # Every response is a stored query row; `store: false` cannot be honoured.
        if value is False:
            raise PydanticCustomError("store_unsupported", "store=false is not supported: every response is stored")
        return value


# OpenAI's bounds of an expiry's `seconds`: one hour to 30 days.
MIN_EXPIRES_SECONDS, MAX_EXPIRES_SECONDS = 3600, 30 * 24 * 3600


class ExpiresAfter(_Body):
    """A file's expiry: `expires_after` of `POST /v1/files` (a multipart form: `expires_after[anchor]`,
    `expires_after[seconds]`), `output_expires_after` of `POST /v1/batches`."""

    anchor: Literal["created_at"]
    seconds: int = Field(ge=MIN_EXPIRES_SECONDS, le=MAX_EXPIRES_SECONDS)


class BatchCreate(_Body):
    """`POST /v1/batches`."""

    input_file_id: str = Field(max_length=100)
    endpoint: Literal["/v1/chat/completions", "/v1/responses"]
    completion_window: Literal["24h"]
    metadata: Metadata | None = None
    # Of its output and error files, from their creation (else BATCH_OUTPUT_EXPIRES_SECONDS).
    output_expires_after: ExpiresAfter | None = None


class OpenAIError(BaseModel):
    message: str = Field(description="What went wrong, for humans")
    type: str = Field(description="OpenAI's error type, e.g. `invalid_request_error`, `requests`, `server_error`")
    param: str | None = Field(description="The request field at fault, e.g. `messages.0.role`; null if none")
    code: str | None = Field(description="Stable machine-readable code, e.g. `invalid_api_key`, `not_found`")


class OpenAIErrorBody(BaseModel):
    """Every 4xx and 5xx answer under `/v1` has OpenAI's error shape."""

    error: OpenAIError
