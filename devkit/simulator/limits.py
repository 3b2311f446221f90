"""A strict provider's per-model rate limits: requests and tokens per minute, and calls in flight.

Requests and tokens per minute are token buckets like OpenAI's: each holds `limit * burst_seconds / 60`
and refills continuously at `limit / 60` per second, so with the default 60 s burst a full minute's
budget can be spent at once and then comes back gradually (OpenAI also enforces some limits over shorter
periods; a smaller burst models that). A request is counted when it arrives (prompt estimate plus
`max_tokens`, as OpenAI counts it) and never settled afterwards; rejected requests are not counted.
Everything runs on the simulator's event loop thread, so a check and its charge are one atomic step.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from devkit.simulator.asgi import Headers

LIMIT_KEYS: tuple[str, ...] = ("rpm", "tpm", "concurrency")
MAX_TRACKED_MODELS = 10_000
_MINUTE = 60.0


class LimitsError(ValueError):
    """A per-model limits specification is malformed."""


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """The limits of one model; 0 means unlimited."""

    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0

    @property
    def enabled(self) -> bool:
        """Whether any limit applies."""
        return bool(self.rpm or self.tpm or self.concurrency)


def parse_model_limits(value: Any) -> dict[str, dict[str, int]]:
    """Normalize `{"model": {"rpm": N, "tpm": N, "concurrency": N}}` given as a mapping or a JSON string."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise LimitsError("model_limits must be a JSON object") from None
    if not isinstance(value, Mapping):
        raise LimitsError("model_limits must be an object mapping model names to limits")
    result: dict[str, dict[str, int]] = {}
    for model, limits in value.items():
        if not isinstance(model, str) or not model:
            raise LimitsError("model_limits keys must be non-empty model names")
        if not isinstance(limits, Mapping):
            raise LimitsError(f"model_limits[{model!r}] must be an object with rpm, tpm and/or concurrency")
        unknown = sorted(set(limits) - set(LIMIT_KEYS))
        if unknown:
            raise LimitsError(f"model_limits[{model!r}] has unknown key(s): {', '.join(map(str, unknown))}")
        entry: dict[str, int] = {}
        for key, raw in limits.items():
            if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
                raise LimitsError(f"model_limits[{model!r}].{key} must be an integer >= 0")
            entry[key] = raw
        result[model] = entry
    return result


def go_duration(seconds: float) -> str:
    """A duration as Go prints it, which is what OpenAI's reset headers carry: `20ms`, `1.5s`, `6m0s`."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, millis = divmod(rest, 1000)
    secs = f"{whole}.{millis:03d}".rstrip("0").rstrip(".") if millis else str(whole)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class Bucket:
    """A continuously refilling token bucket; its level may go below zero after a request larger than it holds."""

    __slots__ = ("level", "stamp")

    def __init__(self, level: float, stamp: float) -> None:
        self.level = level
        self.stamp = stamp

    def refill(self, now: float, capacity: float, per_second: float) -> float:
        """Bring the level up to `now` and return it."""
        if now > self.stamp:
            self.level = min(capacity, self.level + (now - self.stamp) * per_second)
            self.stamp = now
        elif self.level > capacity:
            self.level = capacity
        return self.level


class RateLimited(Exception):
    """A request over one of its model's limits; `dimension` is `requests`, `tokens` or `concurrency`."""

    def __init__(
        self,
        model: str,
        dimension: str,
        limit: int,
        used: int,
        requested: int,
        retry_after: float | None,
        headers: Headers,
    ) -> None:
        super().__init__(f"{model} over its {dimension} limit")
        self.model = model
        self.dimension = dimension
        self.limit = limit
        self.used = used
        self.requested = requested
        self.retry_after = retry_after
        self.headers = headers

    def message(self) -> str:
        """OpenAI's wording of the 429."""
        org = "in organization org-aiqsim"
        if self.retry_after is None:
            return (
                f"Request too large for {self.model} {org} on tokens per min (TPM): Limit {self.limit}, "
                f"Requested {self.requested}. The input or output tokens must be reduced in order to run "
                "successfully."
            )
        what = {
            "requests": "requests per min (RPM)",
            "tokens": "tokens per min (TPM)",
            "concurrency": "concurrent requests",
        }[self.dimension]
        return (
            f"Rate limit reached for {self.model} {org} on {what}: Limit {self.limit}, Used {self.used}, "
            f"Requested {self.requested}. Please try again in {go_duration(self.retry_after)}."
        )


class _ModelState:
    __slots__ = ("in_flight", "requests", "tokens")

    def __init__(self) -> None:
        self.requests: Bucket | None = None
        self.tokens: Bucket | None = None
        self.in_flight = 0


class RateLimiter:
    """The buckets and in-flight counts of every model seen; one instance per simulator."""

    def __init__(self) -> None:
        self._models: OrderedDict[str, _ModelState] = OrderedDict()

    def acquire(
        self,
        model: str,
        tokens: int,
        limits: ModelLimits,
        burst_seconds: float,
        now: float,
        concurrency_retry: float,
    ) -> Headers:
        """Charge one request of `tokens` tokens or raise `RateLimited`; return the `x-ratelimit-*` headers.

        A successful acquire with a concurrency limit must be paired with `release(model)`.
        """
        if not limits.enabled:
            return ()
        state = self._state(model)
        burst = burst_seconds / _MINUTE
        req_level = tok_level = 0.0
        if limits.rpm:
            req_capacity, req_rate = limits.rpm * burst, limits.rpm / _MINUTE
            if state.requests is None:
                state.requests = Bucket(req_capacity, now)
            req_level = state.requests.refill(now, req_capacity, req_rate)
        if limits.tpm:
            tok_capacity, tok_rate = limits.tpm * burst, limits.tpm / _MINUTE
            if state.tokens is None:
                state.tokens = Bucket(tok_capacity, now)
            tok_level = state.tokens.refill(now, tok_capacity, tok_rate)

        if limits.rpm:
            need = min(1.0, req_capacity)
            if req_level < need:
                raise RateLimited(
                    model,
                    "requests",
                    limits.rpm,
                    math.ceil(req_capacity - req_level),
                    1,
                    (need - req_level) / req_rate,
                    self._headers(state, limits, burst),
                )
        if limits.tpm:
            if tokens > limits.tpm:
                raise RateLimited(model, "tokens", limits.tpm, 0, tokens, None, self._headers(state, limits, burst))
            # A request bigger than the burst may overdraw a full bucket; otherwise it could never run.
            need = min(float(tokens), tok_capacity)
            if tok_level < need:
                raise RateLimited(
                    model,
                    "tokens",
                    limits.tpm,
                    math.ceil(tok_capacity - tok_level),
                    tokens,
                    (need - tok_level) / tok_rate,
                    self._headers(state, limits, burst),
                )
        if limits.concurrency and state.in_flight >= limits.concurrency:
            raise RateLimited(
                model,
                "concurrency",
                limits.concurrency,
                state.in_flight,
                1,
                concurrency_retry,
                self._headers(state, limits, burst),
            )

        if state.requests is not None and limits.rpm:
            state.requests.level -= 1
        if state.tokens is not None and limits.tpm:
            state.tokens.level -= tokens
        if limits.concurrency:
            state.in_flight += 1
        return self._headers(state, limits, burst)

    def release(self, model: str) -> None:
        """Give back the in-flight slot taken by `acquire`."""
        state = self._models.get(model)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1

    def refill_all(self) -> None:
        """Forget every bucket (they start full again); calls in flight keep their slots."""
        for state in self._models.values():
            state.requests = None
            state.tokens = None

    def _state(self, model: str) -> _ModelState:
        state = self._models.get(model)
        if state is None:
            state = self._models[model] = _ModelState()
            if len(self._models) > MAX_TRACKED_MODELS:
                for name, old in self._models.items():
                    if old.in_flight == 0 and name != model:
                        del self._models[name]
                        break
        else:
            self._models.move_to_end(model)
        return state

    @staticmethod
    def _headers(state: _ModelState, limits: ModelLimits, burst: float) -> Headers:
        headers: list[tuple[bytes, bytes]] = []
        for name, limit, bucket in (("requests", limits.rpm, state.requests), ("tokens", limits.tpm, state.tokens)):
            if not limit or bucket is None:
                continue
            capacity = limit * burst
            remaining = max(0, math.floor(bucket.level))
            reset = (capacity - bucket.level) / (limit / _MINUTE)
            headers.extend(
                (
                    (f"x-ratelimit-limit-{name}".encode(), str(limit).encode()),
                    (f"x-ratelimit-remaining-{name}".encode(), str(remaining).encode()),
                    (f"x-ratelimit-reset-{name}".encode(), go_duration(reset).encode()),
                )
            )
        return headers
