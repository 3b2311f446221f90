"""The simulator as a raw ASGI application: OpenAI-compatible endpoints, fault injection and `/_sim` admin."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from devkit.simulator._json import dumps, loads
from devkit.simulator.asgi import (
    SSE_HEADERS,
    BodyTooLarge,
    ClientDisconnected,
    Headers,
    Message,
    Receive,
    Scope,
    Send,
    drop_connection,
    read_body,
    send_json,
    sleep_unless_disconnected,
)
from devkit.simulator.config import ConfigError, SimulatorConfig
from devkit.simulator.directives import (
    FAIL_KINDS,
    DirectiveError,
    Directives,
    answer_text,
    echoed_messages,
    estimate_tokens,
    last_user_text,
    parse_directives,
    prompt_chars,
)
from devkit.simulator.limits import MAX_TRACKED_MODELS, RateLimited, RateLimiter

MODELS: tuple[str, ...] = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-4.1",
    "gpt-3.5-turbo",
)
DEFAULT_COMPLETION_TOKENS = 16
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_TRACKED_QUERIES = 200_000
MAX_TRACKED_PROMPTS = 200_000
# The Retry-After hint of a concurrency 429 when the configured latency is (near) zero.
MIN_CONCURRENCY_RETRY_SECONDS = 0.01
VALID_ROLES = ("system", "assistant", "user", "function", "tool", "developer")
QUERY_ID_HEADER = b"x-aiq-query-id"
SYSTEM_FINGERPRINT = "fp_aiqsim"
# Content chunks are grouped per ASGI send so a long stream costs a few writes, not one per token.
STREAM_BATCH = 16

_OPENAI_HELP = "https://platform.openai.com/account/api-keys"
_MODELS_CREATED = 1_700_000_000

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class RequestError(Exception):
    """A request that must be answered with an OpenAI-style error."""

    def __init__(self, status: int, body: dict[str, Any], kind: str, headers: Headers = ()) -> None:
        super().__init__(body["error"]["message"])
        self.status = status
        self.body = body
        self.kind = kind
        self.headers = headers


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> RequestError:
    """A 400 `invalid_request_error`."""
    return RequestError(400, error_body(message, "invalid_request_error", param, code), "400")


def _mask_key(key: str) -> str:
    # Echo only enough of a wrong key to recognise it, as OpenAI does; never the whole secret.
    return f"{key[:3]}***{key[-4:]}" if len(key) >= 12 else "***"


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    return "an object"


def _optional_int(body: dict[str, Any], name: str, minimum: int, maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_request(
            f"Invalid type for '{name}': expected an integer, but got {_type_name(value)} instead.",
            name,
            "invalid_type",
        )
    if value < minimum:
        raise invalid_request(
            f"Invalid '{name}': integer below minimum value. Expected a value >= {minimum}, but got {value} instead.",
            name,
            "integer_below_min_value",
        )
    if maximum is not None and value > maximum:
        raise invalid_request(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {maximum}, but got {value} instead.",
            name,
            "integer_above_max_value",
        )
    return value


def _check_number(body: dict[str, Any], name: str, minimum: float, maximum: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_request(
            f"Invalid type for '{name}': expected a decimal, but got {_type_name(value)} instead.",
            name,
            "invalid_type",
        )
    if value < minimum:
        raise invalid_request(
            f"Invalid '{name}': decimal below minimum value. Expected a value >= {minimum:g}, but got {value} instead.",
            name,
            "decimal_below_min_value",
        )
    if value > maximum:
        raise invalid_request(
            f"Invalid '{name}': decimal above maximum value. Expected a value <= {maximum:g}, but got {value} instead.",
            name,
            "decimal_above_max_value",
        )


def validate_chat_body(raw: bytes) -> dict[str, Any]:
    """Parse and validate a chat-completions body the way OpenAI does, enough for clients to rely on."""
    try:
        body = loads(raw)
    except ValueError:
        raise invalid_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid "
            "JSON.)"
        ) from None
    if not isinstance(body, dict):
        raise invalid_request(f"Invalid type for body: expected an object, but got {_type_name(body)} instead.")
    model = body.get("model")
    if model is None or model == "":
        raise invalid_request("you must provide a model parameter")
    if not isinstance(model, str):
        raise invalid_request(
            f"Invalid type for 'model': expected a string, but got {_type_name(model)} instead.",
            "model",
            "invalid_type",
        )
    messages = body.get("messages")
    if messages is None:
        raise invalid_request(
            "Missing required parameter: 'messages'.",
            "messages",
            "missing_required_parameter",
        )
    if not isinstance(messages, list):
        raise invalid_request(
            f"Invalid type for 'messages': expected an array of objects, but got {_type_name(messages)} instead.",
            "messages",
            "invalid_type",
        )
    if not messages:
        raise invalid_request(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            "messages",
            "empty_array",
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid_request(
                f"Invalid type for 'messages[{index}]': expected an object, but got {_type_name(message)} instead.",
                f"messages[{index}]",
                "invalid_type",
            )
        role = message.get("role")
        if role is None:
            raise invalid_request(
                f"Missing required parameter: 'messages[{index}].role'.",
                f"messages[{index}].role",
                "missing_required_parameter",
            )
        if role not in VALID_ROLES:
            raise invalid_request(
                f"Invalid value: '{role}'. Supported values are: 'system', 'assistant', 'user', 'function', "
                "'tool', and 'developer'.",
                f"messages[{index}].role",
                "invalid_value",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid_request(
                f"Invalid type for 'messages[{index}].content': expected one of a string or array of objects, "
                f"but got {_type_name(content)} instead.",
                f"messages[{index}].content",
                "invalid_type",
            )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_request(
            f"Invalid type for 'stream': expected a boolean, but got {_type_name(stream)} instead.",
            "stream",
            "invalid_type",
        )
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise invalid_request(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
            )
        if not isinstance(stream_options, dict):
            raise invalid_request(
                f"Invalid type for 'stream_options': expected an object, but got {_type_name(stream_options)} instead.",
                "stream_options",
                "invalid_type",
            )
    _optional_int(body, "max_tokens", 1)
    _optional_int(body, "max_completion_tokens", 1)
    _optional_int(body, "n", 1, 128)
    _check_number(body, "temperature", 0, 2)
    _check_number(body, "top_p", 0, 1)
    return body


class SimulatorStats:
    """Counters behind `GET /_sim/stats`; only touched from the event loop thread."""

    def __init__(self) -> None:
        self.reset(in_flight=0)

    def reset(self, in_flight: int) -> None:
        """Zero every counter; requests still running keep counting as in flight."""
        self.total_calls = 0
        self.completed_calls = 0
        self.streamed_calls = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.faults: dict[str, int] = dict.fromkeys(sorted(FAIL_KINDS), 0)
        self.in_flight = in_flight
        self.max_in_flight = in_flight
        self.calls_by_query: OrderedDict[str, int] = OrderedDict()
        # 429s of the strict-provider limits per model and dimension (requests, tokens, concurrency).
        self.rate_limited: dict[str, dict[str, int]] = {}
        # When the latest call of a query sent its first body bytes (wall clock): the bench's time-to-first-token
        # reference. Bounded like `calls_by_query`; reported only for the ids asked for.
        self.first_body_at: OrderedDict[str, float] = OrderedDict()
        self.started_at = time.time()

    def count_rate_limited(self, model: str, dimension: str) -> None:
        """Count one 429 of the limits; models beyond the tracking bound share one entry."""
        per_model = self.rate_limited.get(model)
        if per_model is None:
            if len(self.rate_limited) >= MAX_TRACKED_MODELS:
                model = "(other)"
            per_model = self.rate_limited.setdefault(model, {"requests": 0, "tokens": 0, "concurrency": 0})
        per_model[dimension] += 1

    def note_first_body(self, query_id: str) -> None:
        self.first_body_at[query_id] = time.time()
        self.first_body_at.move_to_end(query_id)
        if len(self.first_body_at) > MAX_TRACKED_QUERIES:
            self.first_body_at.popitem(last=False)

    def count_query(self, query_id: str) -> None:
        """Count one call for `query_id`, forgetting the least recently seen id beyond the bound."""
        calls = self.calls_by_query
        count = calls.get(query_id)
        if count is None:
            calls[query_id] = 1
            if len(calls) > MAX_TRACKED_QUERIES:
                calls.popitem(last=False)
        else:
            calls[query_id] = count + 1
            calls.move_to_end(query_id)

    def snapshot(self, query_ids: list[str] | None, include_queries: bool) -> dict[str, Any]:
        """The JSON document served by `GET /_sim/stats`."""
        data: dict[str, Any] = {
            "total_calls": self.total_calls,
            "completed_calls": self.completed_calls,
            "streamed_calls": self.streamed_calls,
            "faults": dict(self.faults),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tracked_queries": len(self.calls_by_query),
            "rate_limited_calls": sum(sum(counts.values()) for counts in self.rate_limited.values()),
            "rate_limited": {model: dict(counts) for model, counts in self.rate_limited.items()},
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }
        if query_ids is not None:
            data["calls_by_query"] = {q: self.calls_by_query[q] for q in query_ids if q in self.calls_by_query}
            data["first_body_at"] = {q: self.first_body_at[q] for q in query_ids if q in self.first_body_at}
        elif include_queries:
            data["calls_by_query"] = self.calls_by_query
        return data


class SimulatorApp:
    """The ASGI callable; `config` may be swapped at any time (it is immutable)."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = SimulatorStats()
        self.rng = random.Random(config.seed)
        self.limiter = RateLimiter()
        # Calls seen per identical (model, messages) carrying a `fail` directive, for `times=N`.
        self.directive_calls: OrderedDict[bytes, int] = OrderedDict()
        self._routes: dict[tuple[str, str], Handler] = {
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("GET", "/v1/models"): self.list_models,
            ("GET", "/healthz"): self.healthz,
            ("GET", "/_sim/stats"): self.get_stats,
            ("POST", "/_sim/reset"): self.reset,
            ("GET", "/_sim/config"): self.get_config,
            ("POST", "/_sim/config"): self.set_config,
        }
        self._paths = {path for _, path in self._routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        kind = scope["type"]
        if kind == "http":
            await self._dispatch(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        # Clients configured with a base URL without `/v1` still reach the OpenAI routes.
        if path.startswith(("/chat/", "/models")):
            path = "/v1" + path
        handler = self._routes.get((method, path))
        if handler is not None:
            await handler(scope, receive, send)
        elif path.startswith("/v1/models/") and method == "GET":
            await self.retrieve_model(scope, receive, send)
        elif path in self._paths:
            await send_json(
                send,
                405,
                error_body(f"Method {method} not allowed for {path}", "invalid_request_error"),
            )
        else:
            await send_json(
                send,
                404,
                error_body(f"Invalid URL ({method} {path})", "invalid_request_error"),
            )

    def _auth_error(self, scope: Scope) -> RequestError | None:
        expected = self.config.api_key
        if expected is None:
            return None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                token = token.strip()
                if scheme.lower() == "bearer" and token:
                    if hmac.compare_digest(token.encode(), expected.encode()):
                        return None
                    return RequestError(
                        401,
                        error_body(
                            f"Incorrect API key provided: {_mask_key(token)}. You can find your API key at "
                            f"{_OPENAI_HELP}.",
                            "invalid_request_error",
                            code="invalid_api_key",
                        ),
                        "401",
                    )
                break
        return RequestError(
            401,
            error_body(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
            ),
            "401",
        )

    async def chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`POST /v1/chat/completions`, with faults decided by directive first and random rates second."""
        stats = self.stats
        stats.total_calls += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            for name, value in scope["headers"]:
                if name == QUERY_ID_HEADER:
                    query_id = value.decode("latin-1")
                    stats.count_query(query_id)
                    send = self._noting_first_body(send, query_id)
                    break
            await self._chat(scope, receive, send)
        except RateLimited as exc:
            stats.count_rate_limited(exc.model, exc.dimension)
            await send_json(send, 429, self._rate_limited_body(exc), self._rate_limited_headers(exc))
        except RequestError as exc:
            self.stats.faults[exc.kind] = self.stats.faults.get(exc.kind, 0) + 1
            await send_json(send, exc.status, exc.body, exc.headers)
        except ClientDisconnected:
            pass
        finally:
            self.stats.in_flight -= 1

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        auth_error = self._auth_error(scope)
        if auth_error is not None:
            raise auth_error
        try:
            raw = await read_body(receive, MAX_BODY_BYTES)
        except BodyTooLarge:
            raise RequestError(
                413,
                error_body(
                    f"Request body too large; the limit is {MAX_BODY_BYTES} bytes.",
                    "invalid_request_error",
                ),
                "400",
            ) from None
        body = validate_chat_body(raw)
        messages: list[dict[str, Any]] = body["messages"]
        model: str = body["model"]
        try:
            directives = parse_directives(last_user_text(messages))
        except DirectiveError as exc:
            raise invalid_request(f"Invalid simulator directive: {exc}", "messages") from None

        config = self.config
        limits = config.limits_for(model)
        if not limits.enabled:
            await self._call(send, receive, body, messages, model, directives, config, ())
            return
        limit_headers = self.limiter.acquire(
            model,
            self._counted_tokens(body, messages, directives),
            limits,
            config.limit_burst_seconds,
            time.monotonic(),
            max(config.latency_ms / 1000, MIN_CONCURRENCY_RETRY_SECONDS),
        )
        try:
            await self._call(send, receive, body, messages, model, directives, config, limit_headers)
        finally:
            if limits.concurrency:
                self.limiter.release(model)

    @staticmethod
    def _counted_tokens(body: dict[str, Any], messages: list[dict[str, Any]], directives: Directives) -> int:
        # OpenAI counts a request on arrival as its prompt estimate plus max_tokens (times n); without a
        # cap the simulator counts the answer it is going to write.
        caps = [cap for cap in (body.get("max_tokens"), body.get("max_completion_tokens")) if cap is not None]
        completion = (
            min(caps) if caps else (DEFAULT_COMPLETION_TOKENS if directives.tokens is None else directives.tokens)
        )
        return estimate_tokens(prompt_chars(messages)) + completion * (body.get("n") or 1)

    @staticmethod
    def _rate_limited_body(exc: RateLimited) -> dict[str, Any]:
        type_ = "tokens" if exc.dimension == "tokens" else "requests"
        return error_body(exc.message(), type_, code="rate_limit_exceeded")

    @staticmethod
    def _rate_limited_headers(exc: RateLimited) -> Headers:
        headers = list(exc.headers)
        if exc.retry_after is not None:
            # Retry-After carries whole seconds (RFC 9110); the exact value rides in retry-after-ms.
            headers.append((b"retry-after", str(math.ceil(exc.retry_after)).encode()))
            headers.append((b"retry-after-ms", str(math.ceil(exc.retry_after * 1000)).encode()))
        return headers

    async def _call(
        self,
        send: Send,
        receive: Receive,
        body: dict[str, Any],
        messages: list[dict[str, Any]],
        model: str,
        directives: Directives,
        config: SimulatorConfig,
        limit_headers: Headers,
    ) -> None:
        # A `fail` directive makes the call deterministic: random faults never touch it, so
        # `times=N` really means "N failures, then success".
        fault = self._directive_fault(directives, model, messages) if directives.fail else self._random_fault(config)
        if directives.latency_ms is not None:
            latency_ms = directives.latency_ms
        else:
            latency_ms = config.latency_ms
            if config.latency_jitter_ms:
                jitter = config.latency_jitter_ms
                latency_ms = max(0.0, latency_ms + self.rng.uniform(-jitter, jitter))

        if fault is not None:
            # Rejections (rate limit, quota, 4xx) come back at once, like a gateway would send them;
            # 500 and drop happen after the model "worked" for the usual latency.
            if fault in ("500", "drop") and latency_ms > 0:
                await asyncio.sleep(latency_ms / 1000)
            if fault == "drop":
                self.stats.faults["drop"] += 1
                await drop_connection(receive, send)
                return
            if fault == "hang":
                self.stats.faults["hang"] += 1
                if await sleep_unless_disconnected(receive, config.hang_seconds):
                    return
                latency_ms = 0
            else:
                raise self._fault_error(fault, model, directives, config, limit_headers)

        if latency_ms > 0:
            await asyncio.sleep(latency_ms / 1000)
        await self._answer(send, body, messages, model, directives, limit_headers)

    def _directive_fault(self, directives: Directives, model: str, messages: list[dict[str, Any]]) -> str | None:
        if directives.times is None:
            return directives.fail
        key = hashlib.blake2b(dumps((model, messages)), digest_size=16).digest()
        calls = self.directive_calls.get(key, 0) + 1
        self.directive_calls[key] = calls
        self.directive_calls.move_to_end(key)
        if len(self.directive_calls) > MAX_TRACKED_PROMPTS:
            self.directive_calls.popitem(last=False)
        return directives.fail if calls <= directives.times else None

    def _random_fault(self, config: SimulatorConfig) -> str | None:
        total = config.rate_429 + config.rate_quota + config.rate_500 + config.rate_hang + config.rate_drop
        if total <= 0:
            return None
        draw = self.rng.random()
        for kind, rate in (
            ("429", config.rate_429),
            ("quota", config.rate_quota),
            ("500", config.rate_500),
            ("hang", config.rate_hang),
            ("drop", config.rate_drop),
        ):
            if draw < rate:
                return kind
            draw -= rate
        return None

    def _fault_error(
        self, fault: str, model: str, directives: Directives, config: SimulatorConfig, limit_headers: Headers
    ) -> RequestError:
        if fault == "429":
            if directives.retry_after is not None:
                seconds = float(directives.retry_after)
                header = directives.retry_after
            else:
                seconds = self.rng.uniform(config.retry_after_min, config.retry_after_max)
                # Retry-After carries whole seconds (RFC 9110); the exact value rides in retry-after-ms.
                header = str(math.ceil(seconds))
            # An injected 429 advertises the model's real limits (none when it has none): a client that learns
            # limits from headers must not learn a made-up one from a fault.
            headers = (
                (b"retry-after", header.encode()),
                (b"retry-after-ms", str(round(seconds * 1000)).encode()),
                *limit_headers,
            )
            message = (
                f"Rate limit reached for {model} in organization org-aiqsim on requests per min (RPM): "
                f"Limit 500, Used 500, Requested 1. Please try again in {seconds:.3g}s."
            )
            return RequestError(
                429,
                error_body(message, "requests", code="rate_limit_exceeded"),
                "429",
                headers,
            )
        if fault == "quota":
            message = (
                "You exceeded your current quota, please check your plan and billing details. For more "
                "information on this error, read the docs: "
                "https://platform.openai.com/docs/guides/error-codes/api-errors."
            )
            return RequestError(
                429,
                error_body(message, "insufficient_quota", code="insufficient_quota"),
                "quota",
            )
        if fault == "500":
            message = "The server had an error while processing your request. Sorry about that!"
            return RequestError(500, error_body(message, "server_error"), "500")
        if fault == "401":
            message = f"Incorrect API key provided: sk-***sim. You can find your API key at {_OPENAI_HELP}."
            return RequestError(
                401,
                error_body(message, "invalid_request_error", code="invalid_api_key"),
                "401",
            )
        if fault == "404":
            message = f"The model `{model}` does not exist or you do not have access to it."
            return RequestError(
                404,
                error_body(message, "invalid_request_error", code="model_not_found"),
                "404",
            )
        return invalid_request("Simulated bad request (directive fail=400).")

    def _noting_first_body(self, send: Send, query_id: str) -> Send:
        """`send`, noting when the first body bytes of a 200 go out (`first_body_at` in the stats)."""
        state = {"ok": False, "noted": False}

        async def noting(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                state["ok"] = message["status"] == 200
            elif kind == "http.response.body" and state["ok"] and not state["noted"] and message.get("body"):
                state["noted"] = True
                self.stats.note_first_body(query_id)
            await send(message)

        return noting

    async def _answer(
        self,
        send: Send,
        body: dict[str, Any],
        messages: list[dict[str, Any]],
        model: str,
        directives: Directives,
        limit_headers: Headers,
    ) -> None:
        chars = prompt_chars(messages)
        prompt_tokens = estimate_tokens(chars)
        wanted = DEFAULT_COMPLETION_TOKENS if directives.tokens is None else directives.tokens
        caps = [cap for cap in (body.get("max_tokens"), body.get("max_completion_tokens")) if cap is not None]
        cap = min(caps) if caps else None
        tokens = wanted if cap is None else min(wanted, cap)
        finish_reason = "length" if tokens < wanted else "stop"
        n = body.get("n") or 1
        content = echoed_messages(messages) if directives.echo else answer_text(tokens, chars, last_user_text(messages))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": tokens * n,
            "total_tokens": prompt_tokens + tokens * n,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        headers = ((b"x-request-id", b"req_" + secrets.token_hex(12).encode()), *limit_headers)
        stats = self.stats
        stats.prompt_tokens += prompt_tokens
        stats.completion_tokens += tokens * n
        if body.get("stream"):
            stats.streamed_calls += 1
            options = body.get("stream_options") or {}
            await self._stream(
                send,
                headers,
                completion_id,
                created,
                model,
                content,
                finish_reason,
                n,
                usage,
                bool(options.get("include_usage")),
                directives.chunk_ms,
            )
        else:
            choice_list: list[dict[str, Any]] = [
                {
                    "index": index,
                    "message": {
                        "role": "assistant",
                        "content": content,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
                for index in range(n)
            ]
            await send_json(
                send,
                200,
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": choice_list,
                    "usage": usage,
                    "service_tier": "default",
                    "system_fingerprint": SYSTEM_FINGERPRINT,
                },
                headers,
            )
        stats.completed_calls += 1

    async def _stream(
        self,
        send: Send,
        headers: Headers,
        completion_id: str,
        created: int,
        model: str,
        content: str,
        finish_reason: str,
        n: int,
        usage: dict[str, Any],
        include_usage: bool,
        chunk_ms: float | None = None,
    ) -> None:
        def event(choices: list[dict[str, Any]], chunk_usage: dict[str, Any] | None = None) -> bytes:
            chunk: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": choices,
            }
            # OpenAI adds `usage: null` to every chunk once usage was requested, and fills the last one.
            if include_usage:
                chunk["usage"] = chunk_usage
            return b"data: " + dumps(chunk) + b"\n\n"

        await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *headers]})
        words = content.split(" ") if content else []
        pieces = [words[0], *(" " + word for word in words[1:])] if words else []
        events = [
            event(
                [
                    {
                        "index": index,
                        "delta": {"role": "assistant", "content": "", "refusal": None},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for index in range(n)
                ]
            )
        ]
        for piece in pieces:
            events.append(
                event(
                    [
                        {
                            "index": index,
                            "delta": {"content": piece},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for index in range(n)
                    ]
                )
            )
            if chunk_ms is not None:
                # A slow stream (`chunk_ms` directive): every word on its own, after a pause.
                await asyncio.sleep(chunk_ms / 1000)
                await send({"type": "http.response.body", "body": b"".join(events), "more_body": True})
                events = []
            elif len(events) >= STREAM_BATCH:
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"".join(events),
                        "more_body": True,
                    }
                )
                events = []
        events.append(
            event(
                [
                    {
                        "index": index,
                        "delta": {},
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                    for index in range(n)
                ]
            )
        )
        if include_usage:
            events.append(event([], usage))
        events.append(b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b"".join(events), "more_body": False})

    async def list_models(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`GET /v1/models`."""
        auth_error = self._auth_error(scope)
        if auth_error is not None:
            await send_json(send, auth_error.status, auth_error.body)
            return
        data = [
            {
                "id": name,
                "object": "model",
                "created": _MODELS_CREATED,
                "owned_by": "aiq-simulator",
            }
            for name in MODELS
        ]
        await send_json(send, 200, {"object": "list", "data": data})

    async def retrieve_model(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`GET /v1/models/{model}`: every name exists, since completions accept any model."""
        auth_error = self._auth_error(scope)
        if auth_error is not None:
            await send_json(send, auth_error.status, auth_error.body)
            return
        name = scope["path"].rstrip("/").split("/v1/models/", 1)[-1]
        await send_json(
            send,
            200,
            {
                "id": name,
                "object": "model",
                "created": _MODELS_CREATED,
                "owned_by": "aiq-simulator",
            },
        )

    async def healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`GET /healthz`."""
        await send_json(send, 200, {"status": "ok"})

    async def get_stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`GET /_sim/stats[?query_id=...][&queries=0]`."""
        params = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        query_ids = params.get("query_id")
        include = params.get("queries", ["1"])[-1].lower() not in ("0", "false", "no")
        await send_json(send, 200, self.stats.snapshot(query_ids, include))

    async def reset(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`POST /_sim/reset`: zero the stats and the `times=N` counters, refill the rate-limit buckets."""
        self.stats.reset(in_flight=self.stats.in_flight)
        self.directive_calls.clear()
        self.limiter.refill_all()
        await send_json(send, 200, {"status": "reset"})

    async def get_config(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`GET /_sim/config`."""
        await send_json(send, 200, self.config.live_view())

    async def set_config(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`POST /_sim/config`: change latency and fault rates on the running simulator."""
        try:
            updates = loads(await read_body(receive, 1024 * 1024))
            if not isinstance(updates, dict):
                raise ConfigError("body must be a JSON object")
            config = self.config.with_updates(updates)
        except ClientDisconnected:
            return
        except (ValueError, BodyTooLarge) as exc:
            # ConfigError is a ValueError, and so is malformed JSON.
            message = str(exc) if isinstance(exc, ConfigError) else "body must be a JSON object"
            await send_json(send, 400, error_body(message, "invalid_request_error"))
            return
        if "seed" in updates:
            self.rng.seed(config.seed)
        self.config = config
        await send_json(send, 200, config.live_view())


def create_app(config: SimulatorConfig | None = None) -> SimulatorApp:
    """Build the simulator ASGI app (defaults come from `SIM_*` environment variables)."""
    return SimulatorApp(config if config is not None else SimulatorConfig.from_env())
