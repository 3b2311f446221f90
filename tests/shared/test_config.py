"""Settings refuse unsafe production configurations."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import warnings

import pytest
from pydantic import ValidationError

from shared.config import BYTES_PER_CHAR, CELERY_BROKER_VARIABLES, DEVELOPMENT_JWT_SECRET, Settings
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


def test_development_falls_back_to_a_shared_insecure_key_that_the_api_warns_of() -> None:
    # Settings are read by every process (worker, commands); only the API, which signs tokens, warns (see
    # tests/api/test_app_startup.py), so reading them says nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        settings = Settings(environment="development", jwt_secret_key="")  # type: ignore[arg-type]
    assert settings.jwt_secret_key.get_secret_value() == DEVELOPMENT_JWT_SECRET
    assert settings.uses_development_jwt_key
    assert not Settings(environment="development", jwt_secret_key=STRONG).uses_development_jwt_key  # type: ignore[arg-type]


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


def test_a_conversation_bound_below_the_query_bound_is_refused() -> None:
    with pytest.raises(ValidationError, match="MAX_CONVERSATION_CHARS"):
        Settings(max_query_chars=5000, max_conversation_chars=4000)
    assert Settings(max_query_chars=5000, max_conversation_chars=5000).max_conversation_chars == 5000


def test_the_default_body_limit_holds_a_conversation_at_its_bound_in_any_script() -> None:
    settings = Settings(jwt_secret_key=STRONG)  # type: ignore[arg-type]
    assert settings.max_body_bytes >= BYTES_PER_CHAR * settings.max_conversation_chars
    # Four bytes a character (emoji, rare CJK) at the bound, as the SDK sends it: under the limit.
    body = json.dumps(
        {"messages": [{"role": "user", "content": "😀" * settings.max_conversation_chars}]}, ensure_ascii=False
    )
    assert len(body.encode()) < settings.max_body_bytes
    with pytest.warns(UserWarning, match="MAX_BODY_BYTES"):
        Settings(max_body_bytes=256 * 1024, jwt_secret_key=STRONG)  # type: ignore[arg-type]


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


def test_the_broker_is_redis_unless_broker_url_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BROKER_URL", *CELERY_BROKER_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    redis_only = Settings(redis_url="redis://cache:6379/2", jwt_secret_key=STRONG)  # type: ignore[arg-type]
    assert redis_only.broker_url == "redis://cache:6379/2"
    assert not redis_only.broker_is_amqp
    monkeypatch.setenv("BROKER_URL", "amqp://aiq:pw@rabbit:5672/aiq")
    rabbit = Settings(redis_url="redis://cache:6379/2", jwt_secret_key=STRONG)  # type: ignore[arg-type]
    assert rabbit.broker_url == "amqp://aiq:pw@rabbit:5672/aiq"
    assert rabbit.broker_is_amqp
    assert rabbit.redis_url == "redis://cache:6379/2"


def test_a_broker_url_kombu_cannot_read_is_refused() -> None:
    for url in ("unix:///tmp/r.sock", "http://rabbit:15672", "rabbit:5672"):
        with pytest.raises(ValidationError, match="BROKER_URL must start with"):
            Settings(broker_url=url, jwt_secret_key=STRONG)  # type: ignore[arg-type]


@pytest.mark.parametrize("variable", CELERY_BROKER_VARIABLES)
def test_a_celery_broker_variable_that_disagrees_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """Celery would read it by itself and consume elsewhere than the API publishes: one clear message instead."""
    monkeypatch.delenv("BROKER_URL", raising=False)
    monkeypatch.setenv(variable, "amqp://guest:topsecret@rabbit:5672//")
    with pytest.raises(ValidationError, match=f"{variable}=amqp://guest:\\*\\*\\*@rabbit:5672// disagrees") as info:
        Settings(redis_url="redis://cache:6379/0", jwt_secret_key=STRONG)  # type: ignore[arg-type]
    assert "topsecret" not in str(info.value)
    assert "set BROKER_URL only" in str(info.value)
    # The same broker named twice is no disagreement.
    monkeypatch.setenv("BROKER_URL", "amqp://guest:topsecret@rabbit:5672//")
    assert Settings(jwt_secret_key=STRONG).broker_is_amqp  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "uvicorn", "api.main:app", "--port", "0"],
        ["-m", "celery", "-A", "worker.celery_app", "worker"],
        ["-m", "celery", "-A", "worker.celery_app", "flower", "--port=0"],
        # What an operator used to Celery types: `--broker` sets CELERY_BROKER_URL before the app is loaded.
        ["-m", "celery", "--broker", "amqp://guest:guest@127.0.0.1:9//", "-A", "worker.celery_app", "worker"],
    ],
    ids=["api", "worker", "flower", "worker --broker"],
)
def test_api_worker_and_flower_refuse_a_celery_broker_they_would_disagree_on(argv: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("BROKER_URL", *CELERY_BROKER_VARIABLES)}
    env.update(ENVIRONMENT="development", REDIS_URL="redis://127.0.0.1:9/0")
    if "--broker" not in argv:
        env["CELERY_BROKER_URL"] = "amqp://guest:guest@127.0.0.1:9//"
    done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "CELERY_BROKER_URL=amqp://guest:***@127.0.0.1:9// disagrees with the broker AIQ uses" in done.stderr
