"""The upstream LLM through the official `openai` SDK, and what its errors mean for a query."""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx2
import openai
from openai import AsyncOpenAI, DefaultAioHttpClient
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam

from shared.config import Settings

log = logging.getLogger(__name__)
OPENAI_BASE_URL = "https://api.openai.com/v1"


def make_client(settings: Settings) -> AsyncOpenAI:
    """One client per worker process: SDK retries off, because the queue owns retries.

    The aiohttp transport (the SDK's `aiohttp` extra) parses HTTP in C: per call it costs a fraction of the
    default pure-Python stack's CPU. Every call in flight may hold a connection, and all are kept alive.
    """
    connections = settings.worker_concurrency + 16
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


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    latency_ms: int
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


async def complete(
    client: AsyncOpenAI,
    *,
    model: str,
    prompt: str,
    system: str | None,
    temperature: float | None,
    max_tokens: int | None,
    headers: dict[str, str],
    on_delta: Callable[[str], None] | None = None,
    stream: bool = True,
) -> Completion:
    """One chat completion, streamed (each content piece goes to `on_delta` as it arrives) unless `stream` is
    off; raises the SDK's exceptions for `classify` to read.

    A provider that refuses to stream is asked again without streaming; a call that did not stream hands its
    whole answer to `on_delta` as one piece.
    """
    messages: list[ChatCompletionMessageParam] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    started = time.perf_counter()
    if stream:
        try:
            return await _streamed(client, model, messages, temperature, max_tokens, headers, on_delta, started)
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
    usage = result.usage
    return Completion(
        text=text,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        total_tokens=usage.total_tokens if usage else None,
        latency_ms=latency_ms,
    )


async def _streamed(
    client: AsyncOpenAI,
    model: str,
    messages: list[ChatCompletionMessageParam],
    temperature: float | None,
    max_tokens: int | None,
    headers: dict[str, str],
    on_delta: Callable[[str], None] | None,
    started: float,
) -> Completion:
    raw = await client.chat.completions.with_raw_response.create(
        model=model,
        messages=messages,
        temperature=openai.omit if temperature is None else temperature,
        max_tokens=openai.omit if max_tokens is None else max_tokens,
        extra_headers=headers,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = raw.parse()
    parts: list[str] = []
    usage: CompletionUsage | None = None
    first_token_ms: int | None = None
    try:
        async for chunk in chunks:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                piece = choice.delta.content if choice.index == 0 else None
                if piece:
                    if first_token_ms is None:
                        first_token_ms = round((time.perf_counter() - started) * 1000)
                    parts.append(piece)
                    if on_delta is not None:
                        on_delta(piece)
    finally:
        await chunks.close()
    return Completion(
        text="".join(parts),
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        total_tokens=usage.total_tokens if usage else None,
        latency_ms=round((time.perf_counter() - started) * 1000),
        first_token_ms=first_token_ms,
    )


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
        return UpstreamFailure(
            "rate_limit",
            "upstream_rate_limited",
            "The model provider is rate limiting requests",
            True,
            retry_after_seconds(exc.response.headers),
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
