"""Settings refuse unsafe production configurations."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from shared.config import DEVELOPMENT_JWT_SECRET, Settings
from shared.llm import make_client

STRONG = "s" * 48


@pytest.mark.parametrize(
    "secret", ["", "change-me", "secret", "short-but-random-31-bytes-xxxxx", DEVELOPMENT_JWT_SECRET]
)
def test_production_refuses_missing_default_or_short_jwt_secret(secret: str) -> None:
    with pytest.raises(ValidationError, match="JWT_SECRET_KEY"):
        Settings(environment="production", jwt_secret_key=secret)  # type: ignore[arg-type]


def test_production_accepts_a_strong_secret() -> None:
    settings = Settings(environment="production", jwt_secret_key=STRONG)  # type: ignore[arg-type]
    assert settings.jwt_secret_key.get_secret_value() == STRONG


def test_development_falls_back_to_a_shared_insecure_key_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="INSECURE"):
        settings = Settings(environment="development", jwt_secret_key="")  # type: ignore[arg-type]
    assert settings.jwt_secret_key.get_secret_value() == DEVELOPMENT_JWT_SECRET


def test_allowed_models_are_comma_separated_and_must_contain_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_MODELS", " a , b ,")
    monkeypatch.setenv("DEFAULT_MODEL", "b")
    assert Settings(jwt_secret_key=STRONG).allowed_models == ["a", "b"]  # type: ignore[arg-type]
    monkeypatch.setenv("DEFAULT_MODEL", "c")
    with pytest.raises(ValidationError, match="DEFAULT_MODEL"):
        Settings(jwt_secret_key=STRONG)  # type: ignore[arg-type]


def test_only_hmac_algorithms_are_accepted() -> None:
    for algorithm in ("none", "RS256"):
        with pytest.raises(ValidationError):
            Settings(jwt_algorithm=algorithm, jwt_secret_key=STRONG)  # type: ignore[arg-type]


def test_heartbeat_must_fit_twice_in_the_lease() -> None:
    with pytest.raises(ValidationError, match="HEARTBEAT_SECONDS"):
        Settings(lease_seconds=10, heartbeat_seconds=6, jwt_secret_key=STRONG)  # type: ignore[arg-type]


def test_driver_urls_and_unix_socket_broker() -> None:
    settings = Settings(
        database_url="postgresql://u@/db?host=/tmp/pg",
        redis_url="unix:///tmp/r/redis.sock",
        jwt_secret_key=STRONG,  # type: ignore[arg-type]
    )
    assert settings.async_database_url == "postgresql+asyncpg://u@/db?host=/tmp/pg"
    assert settings.sync_database_url == "postgresql+psycopg2://u@/db?host=/tmp/pg"
    assert settings.broker_url == "redis+socket:///tmp/r/redis.sock"
    with pytest.raises(ValueError, match="postgresql"):
        Settings(database_url="mysql://x/y", jwt_secret_key=STRONG).sync_database_url  # type: ignore[arg-type]  # noqa: B018


def test_previous_keys_may_not_be_the_development_key() -> None:
    with pytest.raises(ValidationError, match="JWT_PREVIOUS_SECRET_KEYS"):
        Settings(environment="production", jwt_secret_key=STRONG, jwt_previous_secret_keys=DEVELOPMENT_JWT_SECRET)  # type: ignore[arg-type]


def test_blank_openai_base_url_means_openai_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    # What compose's `${OPENAI_BASE_URL:-}` hands the container when the operator sets nothing.
    monkeypatch.setenv("OPENAI_BASE_URL", "")
    settings = Settings(jwt_secret_key=STRONG, openai_api_key="sk-test")  # type: ignore[arg-type]
    assert settings.openai_base_url is None

    async def base_url() -> str:
        client = make_client(settings)
        try:
            return str(client.base_url)
        finally:
            await client.close()

    assert asyncio.run(base_url()).rstrip("/") == "https://api.openai.com/v1"
