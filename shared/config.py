"""Settings: one object, read from the environment and `.env`."""

from __future__ import annotations

import ipaddress
import json
import os
import warnings
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIN_JWT_SECRET_BYTES = 32
# The most bytes a character takes in UTF-8: what a body must allow per character of the text bounds.
BYTES_PER_CHAR = 4
DEVELOPMENT_JWT_SECRET = "aiq-insecure-development-key-never-use-in-production"  # noqa: S105 - dev only, refused elsewhere
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
BROKER_SCHEMES = AMQP_SCHEMES | {"redis", "rediss", "redis+socket"}
# Read by Celery itself (celery/app/utils.py), whatever the app's configuration says.
CELERY_BROKER_VARIABLES = ("CELERY_BROKER_URL", "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL")
# Values that ship in examples or in this code and must never sign production tokens.
KNOWN_DEFAULT_SECRETS = frozenset({"", "change-me", "changeme", "secret", "dev", "development", DEVELOPMENT_JWT_SECRET})


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class CacheScope(StrEnum):
    """Who shares cached answers: each user their own, or everybody."""

    USER = "user"
    GLOBAL = "global"


class Settings(BaseSettings):
    """Every knob of API, worker and sweeper; names match the environment variables."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    environment: Environment = Environment.DEVELOPMENT
    log_level: str = "INFO"

    database_url: str = "postgresql://postgres@127.0.0.1:5432/aiq"
    # Per process: SQLAlchemy up to pool + overflow, the raw asyncpg pool up to pool more (25 at most).
    # Two API processes and a worker then fit PostgreSQL's default max_connections of 100.
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=5, ge=0)
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The one broker of every process (API publish, workers, sweeper, Flower, /readyz): a kombu URL,
    # `redis://…` / `redis+socket://…` or `amqp://…` (RabbitMQ). Unset: REDIS_URL.
    broker_url: str = ""
    queue_name: str = "aiq.queries"
    publish_timeout_seconds: float = Field(default=1.0, gt=0)

    openai_api_key: SecretStr = SecretStr("")
    openai_base_url: str | None = None
    llm_timeout_seconds: float = Field(default=60.0, gt=0)
    allowed_models: Annotated[list[str], NoDecode] = ["gpt-4o-mini"]
    default_model: str = "gpt-4o-mini"
    max_query_chars: int = Field(default=32_000, ge=1)
    # A `/v1` conversation's user and assistant text in all: the turns sent back carry the model's own answers,
    # which MAX_OUTPUT_TOKENS lets grow past MAX_QUERY_CHARS.
    max_conversation_chars: int = Field(default=128_000, ge=1)
    max_output_tokens: int = Field(default=16_384, ge=1)
    max_metadata_bytes: int = Field(default=4_096, ge=2)

    max_attempts: int = Field(default=5, ge=1)
    retry_base_seconds: float = Field(default=1.0, ge=0)
    retry_max_seconds: float = Field(default=60.0, ge=0)
    lease_seconds: float = Field(default=30.0, gt=0)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    sweep_interval_seconds: float = Field(default=10.0, ge=0)
    stale_pending_seconds: float = Field(default=30.0, gt=0)
    shutdown_grace_seconds: float = Field(default=50.0, ge=0)
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=24 * 3600)

    worker_concurrency: int = Field(default=1000, ge=1)
    worker_metrics_port: int = 9540
    # Operator visibility (issue 15): where the worker's metrics server listens. All interfaces for containers
    # (Prometheus scrapes it from outside); `aiq dev` sets 127.0.0.1.
    worker_metrics_host: str = "0.0.0.0"
    worker_send_task_events: bool = False

    # The edge (issue 10.7/10.8): request bodies are refused (413) above this many bytes before they are
    # parsed; the API's Prometheus /metrics is served on this port only (never on the public API port),
    # 0 turns it off.
    # 1 MiB: a `/v1` conversation at MAX_CONVERSATION_CHARS of text that takes four bytes a character in UTF-8
    # (the SDKs send it unescaped) fits, with room for the JSON around it.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    api_metrics_port: int = Field(default=9541, ge=0, le=65535)
    api_metrics_host: str = "0.0.0.0"

    jwt_secret_key: SecretStr = SecretStr("")
    # Still accepted for verification (never for signing) while tokens signed with them may be alive.
    jwt_previous_secret_keys: Annotated[list[SecretStr], NoDecode] = []
    jwt_algorithm: str = "HS256"
    jwt_issuer: str = "aiq"
    jwt_audience: str = "aiq-api"
    access_token_ttl_seconds: int = Field(default=900, ge=30)
    refresh_token_ttl_seconds: int = Field(default=14 * 24 * 3600, ge=60)
    bcrypt_rounds: int = Field(default=12, ge=4, le=31)

    # Accounts (issue 10): password policy (NIST SP 800-63B), the floor cannot go under NIST's 8.
    password_min_length: int = Field(default=8, ge=8, le=64)
    # Limits and accounts (issue 10): per-user submit limits, login/registration throttling, retention.
    # 0 switches a limit off. Per-user overrides live in the `user_limits` table (admin API).
    limit_requests_per_minute: int = Field(default=60, ge=0)
    limit_max_pending: int = Field(default=20, ge=0)
    limit_token_budget: int = Field(default=2_000_000, ge=0)
    limit_token_window_seconds: int = Field(default=24 * 3600, ge=60)
    # How long an API process keeps a user's limits before reading `user_limits` again.
    limits_cache_seconds: float = Field(default=10.0, ge=0)
    login_max_failures: int = Field(default=5, ge=1)
    login_address_max_failures: int = Field(default=20, ge=1)
    login_failure_window_seconds: int = Field(default=900, ge=1)
    login_lockout_max_seconds: int = Field(default=900, ge=1)
    register_per_hour: int = Field(default=10, ge=0)
    # Proxies whose X-Forwarded-For is believed (CIDRs, comma-separated); empty: the TCP peer is the client.
    trusted_proxies: Annotated[list[str], NoDecode] = []
    # Terminal queries finished longer ago than this are deleted by the workers; 0 keeps them forever.
    retention_days: int = Field(default=0, ge=0)
    # Streams (issue 12): the per-query event log behind `GET /api/v1/query/{id}/events`. Its TTL is refreshed
    # by every append; past it, a finished query's stream replays the row. Deltas are coalesced to one append
    # per EVENT_FLUSH_MS. A waiting stream or long-poll re-reads at least every WAKEUP_FALLBACK_SECONDS while
    # the API's wake-up subscriber is disconnected. LLM_STREAM=false for a provider that cannot stream.
    event_log_ttl_seconds: int = Field(default=3600, ge=10)
    event_flush_ms: float = Field(default=20.0, ge=0)
    sse_keepalive_seconds: float = Field(default=15.0, gt=0)
    max_streams_per_user: int = Field(default=20, ge=0)
    wakeup_fallback_seconds: float = Field(default=5.0, gt=0, le=30)
    llm_stream: bool = True

    # The OpenAI-compatible door (issue 13). A foreground `POST /v1/responses` or `/v1/chat/completions`
    # waits at most this long for its query (the SDK's default client timeout is 600 s), then answers 504.
    compat_wait_seconds: float = Field(default=600.0, gt=0, le=3600)
    # `POST /v1/files` (purpose=batch): OpenAI's limits are 200 MB and 50,000 lines per batch file.
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    max_batch_lines: int = Field(default=50_000, ge=1)
    # A batch's output and error files expire this long after they are written (OpenAI: 30 days) unless its
    # `output_expires_after` says otherwise; past it they read as missing and the workers delete them. 0: kept.
    batch_output_expires_seconds: int = Field(default=30 * 24 * 3600, ge=0)
    # An uploaded batch input file without `expires_after` expires this long after its upload, as OpenAI's
    # `purpose=batch` files do (30 days); a batch still reading it keeps it until the batch ends. 0: kept.
    batch_input_expires_seconds: int = Field(default=30 * 24 * 3600, ge=0)

    # Webhooks (issue 12): after a secret rotation the previous secret keeps signing (a second signature) this
    # long; receivers on either secret keep verifying. Hosts, IPs or CIDRs a webhook may reach although they
    # are private, loopback, link-local or metadata addresses (comma-separated; empty: public addresses only).
    webhook_secret_grace_seconds: int = Field(default=24 * 3600, ge=0)
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = []
    # Delay before each retry of a failed delivery (comma-separated seconds, each with +-20 % jitter); the
    # default spreads 8 attempts over about 27 hours. Then the delivery is failed for good.
    webhook_retry_delays_seconds: Annotated[list[float], NoDecode] = [5, 300, 1800, 7200, 18000, 36000, 36000]
    # Resolve, connect and read timeout of one delivery attempt (the request as a whole: at most twice this).
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=60)

    # Response cache (issue 11.4), read by the API at submit: whether a query without `cache` uses it, how long
    # an answer stays, and whether identical requests of different users share answers (`global`) or not.
    response_cache_default: bool = False
    response_cache_ttl_seconds: int = Field(default=3600, ge=1)
    response_cache_scope: CacheScope = CacheScope.USER

    # Flow control (issue 11): the upstream budget every worker shares, per (OPENAI_BASE_URL, model).
    # `model=rpm:3000,tpm:90000,concurrency:50;*=concurrency:64` or the same as JSON; a limit left out is
    # learned from the provider's x-ratelimit-* headers and 429s. Empty: everything is learned.
    upstream_limits: Annotated[dict[str, dict[str, int]], NoDecode] = {}
    # Calls in flight per model while nothing is known about its limits (first start, after a Redis wipe).
    upstream_probe_concurrency: int = Field(default=8, ge=1)
    # What a call reserves of a tokens-per-minute budget for its answer when the query sets no max_tokens.
    upstream_output_estimate: int = Field(default=512, ge=1)
    # Batch work waiting longer than this ranks with interactive work (it never starves).
    batch_ageing_seconds: float = Field(default=300.0, ge=0)

    @field_validator("allowed_models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @field_validator("upstream_limits", mode="before")
    @classmethod
    def _parse_upstream_limits(cls, value: Any) -> Any:
        return parse_upstream_limits(value) if isinstance(value, str) else value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value

    @field_validator("webhook_retry_delays_seconds", mode="before")
    @classmethod
    def _split_delays(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [float(d) for d in value.split(",") if d.strip()]
        if any(d < 0 for d in value):
            raise ValueError("WEBHOOK_RETRY_DELAYS_SECONDS must be non-negative numbers")
        return value

    @field_validator("jwt_previous_secret_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("openai_base_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # Compose and Kubernetes pass an unset variable through as "": that means "OpenAI itself".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("jwt_algorithm")
    @classmethod
    def _pin_hmac(cls, value: str) -> str:
        # A shared-secret service has no business accepting asymmetric or "none" algorithms.
        if value not in {"HS256", "HS384", "HS512"}:
            raise ValueError("JWT_ALGORITHM must be HS256, HS384 or HS512")
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, value: str) -> str:
        value = value.strip()
        if value and urlsplit(value).scheme not in BROKER_SCHEMES:
            raise ValueError(
                f"BROKER_URL must start with one of {', '.join(s + '://' for s in sorted(BROKER_SCHEMES))}; "
                "leave it unset to use REDIS_URL"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.broker_url:
            # Kombu spells a unix-socket Redis differently from redis-py.
            redis = self.redis_url
            self.broker_url = (
                "redis+socket://" + redis.removeprefix("unix://") if redis.startswith("unix://") else redis
            )
        _refuse_disagreeing_celery_broker(self.broker_url)
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError("HEARTBEAT_SECONDS must be at most half of LEASE_SECONDS, or live calls lose their lease")
        if self.max_conversation_chars < self.max_query_chars:
            raise ValueError("MAX_CONVERSATION_CHARS must be at least MAX_QUERY_CHARS (a conversation holds a query)")
        if self.max_body_bytes < BYTES_PER_CHAR * self.max_conversation_chars:
            warnings.warn(
                f"MAX_BODY_BYTES ({self.max_body_bytes}) is below {BYTES_PER_CHAR} x MAX_CONVERSATION_CHARS "
                f"({self.max_conversation_chars}): a conversation of non-Latin text meets the body limit (413) "
                "before its own bound",
                stacklevel=2,
            )
        if not self.allowed_models:
            raise ValueError("ALLOWED_MODELS must name at least one model")
        if self.default_model not in self.allowed_models:
            raise ValueError("DEFAULT_MODEL must be one of ALLOWED_MODELS")
        secret = self.jwt_secret_key.get_secret_value()
        weak = _weak(secret)
        if weak and self.environment is not Environment.DEVELOPMENT:
            raise ValueError(
                "JWT_SECRET_KEY is missing, a known default or shorter than 32 bytes; "
                "set a random value (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
            )
        if any(_weak(k.get_secret_value()) for k in self.jwt_previous_secret_keys):
            raise ValueError("every JWT_PREVIOUS_SECRET_KEYS entry must be at least 32 bytes and not a known default")
        if weak:
            # Development only. A fixed key (not a random one) so that several API processes agree. Only the API
            # signs and verifies tokens, so it is the API that says so when it starts (`uses_development_jwt_key`);
            # a worker or a command that never touches the key says nothing.
            self.jwt_secret_key = SecretStr(DEVELOPMENT_JWT_SECRET)
        return self

    @property
    def uses_development_jwt_key(self) -> bool:
        """Tokens are signed with the public development key (JWT_SECRET_KEY weak or unset, development only)."""
        return self.jwt_secret_key.get_secret_value() == DEVELOPMENT_JWT_SECRET

    @property
    def sync_database_url(self) -> str:
        """SQLAlchemy URL for psycopg2 (migrations, tools)."""
        return _with_driver(self.database_url, "postgresql+psycopg2")

    @property
    def async_database_url(self) -> str:
        """SQLAlchemy URL for asyncpg (API and worker)."""
        return _with_driver(self.database_url, "postgresql+asyncpg")

    @property
    def broker_is_amqp(self) -> bool:
        """RabbitMQ (AMQP 0-9-1) rather than Redis."""
        return urlsplit(self.broker_url).scheme in AMQP_SCHEMES


def _refuse_disagreeing_celery_broker(broker_url: str) -> None:
    """Celery reads these variables by itself and would move the workers to another broker than the API's."""
    for name in CELERY_BROKER_VARIABLES:
        value = os.environ.get(name)
        if value and value != broker_url:
            raise ValueError(
                f"{name}={redact_url(value)} disagrees with the broker AIQ uses ({redact_url(broker_url)}, from "
                "BROKER_URL, else REDIS_URL): Celery would consume from one broker while the API and the sweeper "
                f"publish to the other, and queries would stay pending. Unset {name} and set BROKER_URL only."
            )


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


UPSTREAM_LIMIT_KINDS = frozenset({"rpm", "tpm", "concurrency"})


def parse_upstream_limits(value: str) -> dict[str, dict[str, int]]:
    """`UPSTREAM_LIMITS`: JSON `{"model": {"rpm": 3000}}` or `model=rpm:3000,tpm:90000;*=concurrency:64`."""
    value = value.strip()
    if not value:
        return {}
    parsed: Any
    if value.startswith("{"):
        parsed = json.loads(value)
    else:
        parsed = {}
        for entry in filter(None, (e.strip() for e in value.split(";"))):
            model, sep, spec = entry.partition("=")
            if not sep or not model.strip():
                raise ValueError(f"UPSTREAM_LIMITS entry {entry!r} must look like model=rpm:3000,tpm:90000")
            limits: dict[str, Any] = {}
            for item in filter(None, (i.strip() for i in spec.split(","))):
                kind, sep, number = item.partition(":")
                if not sep:
                    raise ValueError(f"UPSTREAM_LIMITS item {item!r} must look like rpm:3000")
                limits[kind.strip()] = number.strip()
            parsed[model.strip()] = limits
    if not isinstance(parsed, dict):
        raise ValueError("UPSTREAM_LIMITS must map models to limits")
    result: dict[str, dict[str, int]] = {}
    for model, limits in parsed.items():
        if not isinstance(limits, dict) or not set(limits) <= UPSTREAM_LIMIT_KINDS:
            raise ValueError(f"UPSTREAM_LIMITS for {model!r}: limits are rpm, tpm and concurrency")
        result[str(model)] = {kind: int(n) for kind, n in limits.items()}
        if any(n < 0 for n in result[str(model)].values()):
            raise ValueError(f"UPSTREAM_LIMITS for {model!r}: limits must not be negative")
    return result


def _weak(secret: str) -> bool:
    return secret.lower() in KNOWN_DEFAULT_SECRETS or len(secret.encode()) < MIN_JWT_SECRET_BYTES


def _with_driver(url: str, driver: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or urlsplit(url).scheme.split("+")[0] not in {"postgresql", "postgres"}:
        raise ValueError("DATABASE_URL must be a postgresql:// URL")
    del scheme
    return f"{driver}://{rest}"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
