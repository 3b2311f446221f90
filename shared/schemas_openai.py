"""Request bodies of the OpenAI-compatible door (`/v1`), as OpenAI's API reference names their fields, its
error body (`OpenAIErrorBody`, as `api/compat/errors.py` renders it) and the objects it answers (for the OpenAPI
document only: `shared/services` builds them as plain dicts).

Only what AIQ can honour is accepted: an unknown field (tools, response_format …) is a 400 that names it,
never silently dropped; a boolean is JSON's `true`/`false` (`StrictBool`: `"true"` or `1` is a 400, as the
SDK only sends real booleans). A batch line's `body` is parsed with the same models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator
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
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
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
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    max_output_tokens: StrictInt | None = Field(default=None, ge=1)
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


# The objects the `/v1` routes answer, as `shared/services` builds them (plain dicts, for speed). They are
# declared for the OpenAPI document only (`responses={200: {"model": …}}`), never used to validate an answer.


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: str | None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"] = Field(description="`length`: the answer reached its token cap")
    logprobs: None


class ChatCompletion(BaseModel):
    """A completed query as OpenAI's `chat.completion` (`chatcmpl-<hex>`: the query's id)."""

    id: str
    object: Literal["chat.completion"]
    created: int = Field(description="Unix seconds")
    model: str
    choices: list[ChatCompletionChoice] = Field(description="Exactly one")
    usage: CompletionUsage | None


class ChatCompletionChunkDelta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["assistant"] | None = Field(default=None, description="In the first chunk only")
    content: str | None = Field(default=None, description="The next piece of the answer")


class ChatCompletionChunkChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int
    delta: ChatCompletionChunkDelta
    finish_reason: Literal["stop", "length"] | None = Field(description="Set in the answer's last chunk")
    logprobs: None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion (`stream: true`). With `stream_options.include_usage`,
    every chunk has `usage: null` but the last one before `[DONE]`, which has no choices and the usage."""

    model_config = ConfigDict(extra="forbid")

    id: str
    object: Literal["chat.completion.chunk"]
    created: int = Field(description="Unix seconds")
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: CompletionUsage | None = None


# A Responses stream event's `type`, which is also its `event:` name.
RESPONSE_EVENT_TYPE = r"^response\.[a-z_.]+$"


class ResponseStreamEvent(BaseModel):
    """One `data:` event of a streamed Response (`stream: true`): its `type` (also the `event:` name), its place in
    the stream, and the type's own fields (`response`, `delta`, `item`, `part` …), as OpenAI's Responses events."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(pattern=RESPONSE_EVENT_TYPE, examples=["response.output_text.delta"])
    sequence_number: int = Field(ge=0, description="0 for `response.created`, then one more per event")


class ResponseOutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any]


class ResponseOutputMessage(BaseModel):
    type: Literal["message"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[ResponseOutputText]


class ResponseError(BaseModel):
    code: str = Field(description="`server_error`, or `rate_limit_exceeded` when the provider refused on its limits")
    message: str = Field(description="What went wrong, with AIQ's error code in parentheses")


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseFormatText(BaseModel):
    type: Literal["text"]


class ResponseTextConfig(BaseModel):
    format: ResponseFormatText


class ResponseObject(BaseModel):
    """A query as OpenAI's `response` (`resp_<hex>`: the query's id). OpenAI names it `Response`."""

    id: str
    object: Literal["response"]
    created_at: int = Field(description="Unix seconds")
    completed_at: int | None = Field(description="Unix seconds; null unless `completed`")
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled", "incomplete"]
    background: bool
    error: ResponseError | None = Field(description="Set when `failed`")
    incomplete_details: IncompleteDetails | None = Field(description="Set when `incomplete`")
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, Any]
    model: str
    output: list[ResponseOutputMessage] = Field(description="The assistant's message once there is an answer")
    parallel_tool_calls: bool
    temperature: float | None
    tool_choice: Literal["none"]
    tools: list[Any] = Field(description="Always empty: AIQ runs no tools")
    top_p: float | None
    text: ResponseTextConfig
    usage: ResponseUsage | None = Field(description="Null until the model answered")


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response.deleted"]
    deleted: bool


class Model(BaseModel):
    """An allowed model (ALLOWED_MODELS)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class FileObject(BaseModel):
    """OpenAI's `file` (`file-<hex>`)."""

    id: str
    object: Literal["file"]
    bytes: int
    created_at: int = Field(description="Unix seconds")
    expires_at: int | None = Field(description="Unix seconds; null: kept until deleted")
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["processed"]
    status_details: str | None


class FileList(BaseModel):
    """A page of files, newest first: pass `last_id` as `after` for the next one."""

    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchError(BaseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchError]


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class Batch(BaseModel):
    """OpenAI's `batch` (`batch_<hex>`); the `*_at` fields are Unix seconds, null until that step happens."""

    id: str
    object: Literal["batch"]
    endpoint: Literal["/v1/chat/completions", "/v1/responses"]
    errors: BatchErrors | None = Field(description="Batch-level errors, e.g. an unreadable input file")
    input_file_id: str
    completion_window: Literal["24h"]
    status: Literal[
        "validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"
    ]
    output_file_id: str | None = Field(description="The results' JSONL file, once finished")
    error_file_id: str | None = Field(description="The failed lines' JSONL file, once finished")
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None


class BatchList(BaseModel):
    """A page of batches, newest first: pass `last_id` as `after` for the next one."""

    object: Literal["list"]
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool
