"""The upstream LLM through the official `openai` SDK, and what its errors mean for a query."""

from __future__ import annotations

import email.utils
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import httpx2
import openai
import orjson
from openai import AsyncOpenAI, DefaultAioHttpClient
from openai.resources.chat.completions import completions as _chat_completions
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionUserMessageParam, completion_create_params

from shared.config import Settings

log = logging.getLogger(__name__)
OPENAI_BASE_URL = "https://api.openai.com/v1"


def make_client(settings: Settings) -> AsyncOpenAI:
    """One client per worker process: SDK retries off, because the queue owns retries.

    The aiohttp transport (the SDK's `aiohttp` extra) parses HTTP in C: per call it costs a fraction of the
    default pure-Python stack's CPU. Every call in flight may hold a connection, and all are kept alive.
    """
    connections = settings.worker_concurrency + 16
    _skip_identity_transform()
    return AsyncOpenAI(
        api_key=settings.openai_api_key.get_secret_value() or "unset",
        # Always explicit: given None, the SDK would read OPENAI_BASE_URL itself, and "" there means no URL.
        base_url=settings.openai_base_url or OPENAI_BASE_URL,
        max_retries=0,
        timeout=settings.llm_timeout_seconds,
        http_client=DefaultAioHttpClient(
            timeout=settings.llm_timeout_seconds,
            limits=httpx2.Limits(max_connections=connections, max_keepalive_connections=connections),
        ),
    )


# What `complete` passes to `chat.completions.create`; the rest of its parameters are left omitted.
_CALL_KEYS = frozenset({"model", "messages", "stream", "stream_options", "temperature", "max_tokens"})
_CHAT_PARAMS = (
    completion_create_params.CompletionCreateParamsStreaming,
    completion_create_params.CompletionCreateParamsNonStreaming,
)
_SCALAR_KEYS = _CALL_KEYS - {"messages", "stream_options"}
_PATCHED = "_aiq_identity_skipped"


def _identity_body(data: object) -> dict[str, Any] | None:
    """The request body `complete` built, without its omitted values, if the SDK's transform of it is the identity.

    The transform renames aliased keys and formats dates and files, walking the typed parameters to find them;
    none of `_CALL_KEYS` has either (tests/shared/test_llm.py compares with the SDK's own result), and plain
    messages are role and text. Anything else (None: not such a body) goes through the SDK's transform."""
    if not isinstance(data, dict):
        return None
    body: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, openai.Omit | openai.NotGiven):
            continue
        if key not in _CALL_KEYS:
            return None
        body[key] = value
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(
        type(m) is dict and m.keys() <= {"role", "content"} and all(type(v) is str for v in m.values())
        for m in messages
    ):
        return None
    options = body.get("stream_options")
    if options is not None and not (type(options) is dict and options.keys() <= {"include_usage"}):
        return None
    if not all(type(body.get(k)) in (str, int, float, bool, type(None)) for k in _SCALAR_KEYS):
        return None
    return body


def _skip_identity_transform() -> None:
    """Skip the SDK's parameter transform where it would change nothing (the typed call stays as it is).

    Before each `chat.completions.create` the SDK transforms its parameters against their TypedDicts:
    each message is tried against all six message types of the union, hashing typing objects (the model
    `Literal` of every model name) at each step, ~0.25 ms of CPU per call (measured), for a body it returns
    unchanged. Applied once per process; idempotent.
    """
    original: Callable[..., Any] = getattr(_chat_completions, "async_maybe_transform")  # noqa: B009 - not exported
    if getattr(original, _PATCHED, False):
        return

    async def async_maybe_transform(data: object, expected_type: object) -> Any:
        if expected_type in _CHAT_PARAMS:
            body = _identity_body(data)
            if body is not None:
                return body
        return await original(data, expected_type)

    setattr(async_maybe_transform, _PATCHED, True)
    setattr(_chat_completions, "async_maybe_transform", async_maybe_transform)  # noqa: B010 - not exported


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """What a provider advertised in its `x-ratelimit-*` headers; None where a header was missing."""

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    # Seconds until the limit is fully replenished.
    reset_requests: float | None = None
    reset_tokens: float | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.limit_requests, self.limit_tokens))


_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: str | None) -> float | None:
    """A Go duration (`1s`, `6m0s`, `20ms`, `1h2m3.5s`) or plain seconds, in seconds; None if unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    total, pos = 0.0, 0
    for match in _GO_DURATION_PART.finditer(value):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    return total if pos == len(value) and pos > 0 else None


def _int_header(get: object, name: str) -> int | None:
    raw = get(name) if callable(get) else None
    try:
        return max(0, int(float(raw))) if raw else None
    except ValueError:
        return None


def parse_ratelimit_headers(headers: object) -> RateLimitInfo | None:
    """OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`; None when none is present."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    info = RateLimitInfo(
        limit_requests=_int_header(get, "x-ratelimit-limit-requests"),
        limit_tokens=_int_header(get, "x-ratelimit-limit-tokens"),
        remaining_requests=_int_header(get, "x-ratelimit-remaining-requests"),
        remaining_tokens=_int_header(get, "x-ratelimit-remaining-tokens"),
        reset_requests=parse_duration(get("x-ratelimit-reset-requests")),
        reset_tokens=parse_duration(get("x-ratelimit-reset-tokens")),
    )
    return info if info else None


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    latency_ms: int
    # The provider's advertised limits with this answer (learned budgets read them).
    ratelimit: RateLimitInfo | None = None
    # Streamed calls: from the start of the call to its first content delta.
    first_token_ms: int | None = None


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    """A classified upstream error. `message` is ours, never the upstream text (it can echo keys)."""

    kind: str
    code: str
    message: str
    transient: bool
    retry_after: float | None = None
    ratelimit: RateLimitInfo | None = None
    # For a 429: which limit the provider says was hit ("requests" or "tokens"), when it says so.
    limit_type: str | None = None


async def complete(
    client: AsyncOpenAI,
    *,
    model: str,
    prompt: str,
    system: str | None,
    temperature: float | None,
    max_tokens: int | None,
    headers: dict[str, str],
    history: Sequence[Mapping[str, str]] | None = None,
    prompt_name: str | None = None,
    on_delta: Callable[[str], None] | None = None,
    on_end: Callable[[], None] | None = None,
    stream: bool = True,
) -> Completion:
    """One chat completion, streamed (each content piece goes to `on_delta` as it arrives) unless `stream` is
    off; raises the SDK's exceptions for `classify` to read.

    `on_end` is called once the answer's text is all in, in the same loop turn as the read that brought its
    end (before the response is closed): a listener learns then that no piece follows the last one it holds.
    A provider that refuses to stream is asked again without streaming; a call that did not stream hands its
    whole answer to `on_delta` as one piece. The messages: the system prompt, a conversation's earlier turns
    (`history`) in order, then the prompt as the final user message (with its participant `prompt_name`, if any).
    """
    messages: list[ChatCompletionMessageParam] = []
    if system:
        messages.append({"role": "system", "content": system})
    if history:
        # As the row stores them (`ConversationCreate`'s turns): role "user" or "assistant", text, and a `name`
        # when the turn had one.
        messages.extend(cast("Sequence[ChatCompletionMessageParam]", history))
    final: ChatCompletionUserMessageParam = {"role": "user", "content": prompt}
    if prompt_name:
        final["name"] = prompt_name
    messages.append(final)
    started = time.perf_counter()
    if stream:
        try:
            return await _streamed(client, model, messages, temperature, max_tokens, headers, on_delta, on_end, started)
        except openai.BadRequestError as exc:
            if "stream" not in str(exc.message).lower():
                raise
            log.warning("provider refused to stream; calling without streaming", extra={"model": model})
    # The raw response keeps the headers within reach (rate-limit headers).
    raw = await client.chat.completions.with_raw_response.create(
        model=model,
        messages=messages,
        temperature=openai.omit if temperature is None else temperature,
        max_tokens=openai.omit if max_tokens is None else max_tokens,
        extra_headers=headers,
    )
    result = raw.parse()
    latency_ms = round((time.perf_counter() - started) * 1000)
    text = result.choices[0].message.content or "" if result.choices else ""
    if text and on_delta is not None:
        on_delta(text)
    if on_end is not None:
        on_end()
    usage = result.usage
    return Completion(
        text=text,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        total_tokens=usage.total_tokens if usage else None,
        latency_ms=latency_ms,
        ratelimit=parse_ratelimit_headers(raw.headers),
    )


async def _streamed(
    client: AsyncOpenAI,
    model: str,
    messages: list[ChatCompletionMessageParam],
    temperature: float | None,
    max_tokens: int | None,
    headers: dict[str, str],
    on_delta: Callable[[str], None] | None,
    on_end: Callable[[], None] | None,
    started: float,
) -> Completion:
    """The streamed call. The SDK sends it (typed request, retries off, its exceptions for HTTP errors, the
    response headers within reach); the chunks are read here with orjson, taking only the text and the usage:
    the SDK would build a pydantic model per chunk, which cost ~3 ms of CPU per 16-token answer (measured).
    `raw` (like the plain call's) keeps the response headers after the body is read."""
    parts: list[str] = []
    usage: dict[str, Any] | None = None
    first_token_ms: int | None = None
    async with client.chat.completions.with_streaming_response.create(
        model=model,
        messages=messages,
        temperature=openai.omit if temperature is None else temperature,
        max_tokens=openai.omit if max_tokens is None else max_tokens,
        extra_headers=headers,
        stream=True,
        stream_options={"include_usage": True},
    ) as raw:
        async for data in _sse_data(raw.iter_bytes()):
            if data == b"[DONE]":
                break
            chunk = orjson.loads(data)
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error"):
                raise openai.APIError("The provider sent an error in the stream", raw.http_request, body=chunk)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content") if choice.get("index", 0) == 0 else None
                if piece:
                    if first_token_ms is None:
                        first_token_ms = round((time.perf_counter() - started) * 1000)
                    parts.append(piece)
                    if on_delta is not None:
                        on_delta(piece)
        if on_end is not None:
            on_end()
    return Completion(
        text="".join(parts),
        prompt_tokens=_int(usage, "prompt_tokens"),
        completion_tokens=_int(usage, "completion_tokens"),
        total_tokens=_int(usage, "total_tokens"),
        latency_ms=round((time.perf_counter() - started) * 1000),
        first_token_ms=first_token_ms,
        ratelimit=parse_ratelimit_headers(raw.headers),
    )


async def _sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The `data:` payloads of a Server-Sent Events body (one per event; multi-line data joined by newlines)."""
    buffer = b""
    data: list[bytes] = []
    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw_line in lines:
            line = raw_line.rstrip(b"\r")
            if not line:
                if data:
                    yield b"\n".join(data)
                    data = []
            elif line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
    if data:
        yield b"\n".join(data)


def _int(usage: dict[str, Any] | None, key: str) -> int | None:
    value = usage.get(key) if usage else None
    return value if isinstance(value, int) else None


def retry_after_seconds(headers: object) -> float | None:
    """Read `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    millis = get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def classify(exc: BaseException) -> UpstreamFailure:
    """Map an SDK exception to transient (retry) or permanent (fail now)."""
    if isinstance(exc, openai.APITimeoutError):
        return UpstreamFailure("timeout", "upstream_timeout", "The model did not answer in time", True)
    if isinstance(exc, openai.APIConnectionError):
        return UpstreamFailure("connection", "upstream_unreachable", "Could not reach the model provider", True)
    if isinstance(exc, openai.RateLimitError):
        if exc.code == "insufficient_quota" or _error_type(exc) == "insufficient_quota":
            return UpstreamFailure("quota", "upstream_quota_exceeded", "The model provider's quota is exhausted", False)
        limit_type = _error_type(exc)
        return UpstreamFailure(
            "rate_limit",
            "upstream_rate_limited",
            "The model provider is rate limiting requests",
            True,
            retry_after_seconds(exc.response.headers),
            parse_ratelimit_headers(exc.response.headers),
            limit_type if limit_type in ("requests", "tokens") else None,
        )
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return UpstreamFailure(
            "auth", "upstream_auth_failed", "The model provider rejected the service's credentials", False
        )
    if isinstance(exc, openai.NotFoundError):
        return UpstreamFailure("not_found", "model_not_found", "The model provider does not know this model", False)
    if isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
        return UpstreamFailure("bad_request", "upstream_bad_request", "The model provider rejected the request", False)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        transient = status >= 500 or status in (408, 409)
        return UpstreamFailure(
            "server_error" if status >= 500 else "other",
            "upstream_error",
            f"The model provider answered HTTP {status}",
            transient,
            retry_after_seconds(exc.response.headers),
        )
    if isinstance(exc, httpx2.TransportError):
        # A stream cut after its headers: the SDK's own connection errors only cover the request.
        return UpstreamFailure("connection", "upstream_unreachable", "Could not reach the model provider", True)
    if isinstance(exc, orjson.JSONDecodeError):
        return UpstreamFailure(
            "other", "upstream_invalid_response", "The model provider sent an invalid response", True
        )
    if isinstance(exc, openai.APIResponseValidationError):
        return UpstreamFailure(
            "other", "upstream_invalid_response", "The model provider sent an invalid response", True
        )
    return UpstreamFailure("other", "internal_error", "Unexpected error while calling the model", True)


def _error_type(exc: openai.APIStatusError) -> str | None:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            value = inner.get("type")
            return value if isinstance(value, str) else None
    return None


def backoff_seconds(
    settings: Settings, attempt: int, retry_after: float | None, rng: random.Random | None = None
) -> float:
    """Exponential backoff with equal jitter, never sooner than the upstream asked."""
    ceiling = min(settings.retry_max_seconds, settings.retry_base_seconds * 2.0 ** max(0, attempt - 1))
    uniform = rng.uniform if rng is not None else random.uniform
    delay = ceiling / 2 + uniform(0, ceiling / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, settings.retry_max_seconds * 10))
    return delay
