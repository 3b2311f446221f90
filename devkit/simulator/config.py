"""Simulator configuration: the dataclass, its `SIM_*` environment defaults and the CLI parser."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from devkit.simulator.limits import LimitsError, ModelLimits, parse_model_limits

ENV_PREFIX = "SIM_"

# Fields the chaos harness may change on a running simulator through `POST /_sim/config`.
LIVE_FIELDS: tuple[str, ...] = (
    "latency_ms",
    "latency_jitter_ms",
    "rate_429",
    "rate_500",
    "rate_hang",
    "rate_drop",
    "rate_quota",
    "retry_after_min",
    "retry_after_max",
    "hang_seconds",
    "seed",
    "limit_rpm",
    "limit_tpm",
    "limit_concurrency",
    "limit_burst_seconds",
    "model_limits",
)
LOG_LEVELS: tuple[str, ...] = ("critical", "error", "warning", "info", "debug", "trace")
RATE_FIELDS: tuple[str, ...] = (
    "rate_429",
    "rate_500",
    "rate_hang",
    "rate_drop",
    "rate_quota",
)


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Everything that shapes the simulator's behaviour; frozen so a live update is one atomic swap."""

    host: str = "127.0.0.1"
    port: int = 8900
    latency_ms: float = 300.0
    latency_jitter_ms: float = 0.0
    api_key: str | None = None
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_hang: float = 0.0
    rate_drop: float = 0.0
    rate_quota: float = 0.0
    retry_after_min: float = 1.0
    retry_after_max: float = 5.0
    hang_seconds: float = 600.0
    seed: int | None = None
    log_level: str = "info"
    # A strict provider's limits per model (each model has its own budget); 0 means unlimited.
    limit_rpm: int = 0
    limit_tpm: int = 0
    limit_concurrency: int = 0
    limit_burst_seconds: float = 60.0
    # Per-model overrides: {"gpt-4o": {"rpm": 500, "tpm": 30000, "concurrency": 8}} (a JSON string is accepted).
    model_limits: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` when a value is out of range."""
        level = self.log_level.lower()
        if level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        # uvicorn only knows lower-case level names; SIM_LOG_LEVEL=INFO is a natural thing to write.
        object.__setattr__(self, "log_level", level)
        for name in RATE_FIELDS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, got {value}")
        for name in (
            "latency_ms",
            "latency_jitter_ms",
            "retry_after_min",
            "retry_after_max",
            "hang_seconds",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.retry_after_min > self.retry_after_max:
            raise ConfigError("retry_after_min must not exceed retry_after_max")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, got {self.port}")
        for name in ("limit_rpm", "limit_tpm", "limit_concurrency"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.limit_burst_seconds <= 60:
            raise ConfigError(f"limit_burst_seconds must be in (0, 60], got {self.limit_burst_seconds}")
        object.__setattr__(self, "model_limits", coerce("model_limits", self.model_limits))

    def limits_for(self, model: str) -> ModelLimits:
        """The limits that apply to `model`: its `model_limits` entry, else the `limit_*` defaults."""
        entry = self.model_limits.get(model)
        if entry is None:
            return ModelLimits(self.limit_rpm, self.limit_tpm, self.limit_concurrency)
        return ModelLimits(
            entry.get("rpm", self.limit_rpm),
            entry.get("tpm", self.limit_tpm),
            entry.get("concurrency", self.limit_concurrency),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> SimulatorConfig:
        """Build a config from `SIM_*` environment variables, then apply keyword overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + field.name.upper())
            if raw is not None and raw != "":
                values[field.name] = coerce(field.name, raw)
        values.update(overrides)
        return cls(**values)

    def live_view(self) -> dict[str, Any]:
        """The fields `GET /_sim/config` reports (never the API key itself)."""
        data = {name: getattr(self, name) for name in LIVE_FIELDS}
        data["api_key_required"] = self.api_key is not None
        return data

    def with_updates(self, updates: Mapping[str, Any]) -> SimulatorConfig:
        """Return a copy with some live fields changed; raise `ConfigError` on unknown or bad values."""
        unknown = sorted(set(updates) - set(LIVE_FIELDS))
        if unknown:
            raise ConfigError(f"unknown or read-only config field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **{name: coerce(name, value) for name, value in updates.items()})


_INT_FIELDS = frozenset({"port", "limit_rpm", "limit_tpm", "limit_concurrency"})
_OPTIONAL_INT_FIELDS = frozenset({"seed"})
_STR_FIELDS = frozenset({"host", "log_level"})
_OPTIONAL_STR_FIELDS = frozenset({"api_key"})


def coerce(name: str, value: Any) -> Any:
    """Convert a raw value (from env, JSON or argv) to the type of the named field."""
    if name == "model_limits":
        try:
            return parse_model_limits(value)
        except LimitsError as exc:
            raise ConfigError(str(exc)) from None
    if name in _STR_FIELDS:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string")
        return value
    if name in _OPTIONAL_STR_FIELDS:
        if value is None or isinstance(value, str):
            return value or None
        raise ConfigError(f"{name} must be a string or null")
    if name in _OPTIONAL_INT_FIELDS and value is None:
        return None
    # bool is an int subclass; `true` is never a sensible latency or rate.
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        if name in _INT_FIELDS or name in _OPTIONAL_INT_FIELDS:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The `aiq simulate` argument parser, with defaults taken from `SIM_*` variables."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="aiq simulate",
        description="OpenAI-compatible LLM simulator with configurable latency and injected faults. "
        "Every option can also be set with a SIM_<OPTION> environment variable (e.g. SIM_LATENCY_MS).",
    )
    try:
        defaults = SimulatorConfig.from_env(env)
    except ConfigError as exc:
        # Report a bad SIM_* value the way argparse reports a bad flag (usage line, exit status 2).
        parser.error(f"invalid SIM_* environment variable: {exc}")
    parser.add_argument("--host", default=defaults.host, help="bind address (default %(default)s)")
    parser.add_argument("--port", type=int, default=defaults.port, help="TCP port (default %(default)s)")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=defaults.latency_ms,
        help="base response latency (default %(default)s)",
    )
    parser.add_argument(
        "--latency-jitter-ms",
        type=float,
        default=defaults.latency_jitter_ms,
        help="uniform +/- jitter added to the latency (default %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        default=defaults.api_key,
        help="if set, requests must send 'Authorization: Bearer <key>' or get a 401",
    )
    for kind in ("429", "500", "hang", "drop", "quota"):
        parser.add_argument(
            f"--rate-{kind}",
            type=float,
            default=getattr(defaults, f"rate_{kind}"),
            help=f"probability (0..1) of a random '{kind}' fault (default %(default)s)",
        )
    parser.add_argument(
        "--retry-after-min",
        type=float,
        default=defaults.retry_after_min,
        help="lower bound of Retry-After seconds for random 429s (default %(default)s)",
    )
    parser.add_argument(
        "--retry-after-max",
        type=float,
        default=defaults.retry_after_max,
        help="upper bound of Retry-After seconds for random 429s (default %(default)s)",
    )
    parser.add_argument(
        "--hang-seconds",
        type=float,
        default=defaults.hang_seconds,
        help="how long a 'hang' fault holds the request (default %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed for reproducible random faults",
    )
    limits = parser.add_argument_group(
        "strict provider limits",
        "Per-model limits like OpenAI's, with its x-ratelimit-* headers and 429 bodies; 0 (the default) means "
        "unlimited. Every model has its own budget.",
    )
    limits.add_argument(
        "--limit-rpm",
        type=int,
        default=defaults.limit_rpm,
        help="requests per minute per model (default %(default)s)",
    )
    limits.add_argument(
        "--limit-tpm",
        type=int,
        default=defaults.limit_tpm,
        help="tokens per minute per model, counting prompt estimate + max_tokens on arrival (default %(default)s)",
    )
    limits.add_argument(
        "--limit-concurrency",
        type=int,
        default=defaults.limit_concurrency,
        help="calls in flight per model; more get a 429 at once (default %(default)s)",
    )
    limits.add_argument(
        "--limit-burst-seconds",
        type=float,
        default=defaults.limit_burst_seconds,
        help="how many seconds of the per-minute budget can be spent at once (default %(default)s)",
    )
    limits.add_argument(
        "--model-limits",
        default=defaults.model_limits,
        help='per-model overrides as JSON, e.g. \'{"gpt-4o": {"rpm": 500, "tpm": 30000, "concurrency": 8}}\'',
    )
    parser.add_argument(
        "--log-level",
        default=defaults.log_level,
        choices=LOG_LEVELS,
        type=str.lower,
        help="log level (default %(default)s)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Turn parsed CLI arguments into a validated config."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(SimulatorConfig)}
    return SimulatorConfig(**values)
