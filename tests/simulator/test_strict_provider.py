"""The simulator as a strict provider: per-model RPM/TPM/concurrency limits with OpenAI's headers and 429s."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from devkit.procs import free_port, spawn
from devkit.simulator import SimulatorConfig, run_in_thread
from devkit.simulator.config import ConfigError, build_parser, config_from_args
from devkit.simulator.limits import go_duration

MODEL = "gpt-4o-mini"
LIMIT_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)
GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")


def _prompt(text: str = "hello") -> list[Any]:
    return [{"role": "user", "content": f"{uuid.uuid4().hex} {text}"}]


def _sdk(base_url: str) -> openai.OpenAI:
    # Like the worker: the SDK must not retry on its own, so every 429 reaches the test.
    return openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=10)


@pytest.fixture(scope="module")
def limited_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A simulator process limited from its command line (RPM, TPM) and environment (a per-model override)."""
    port = free_port()
    env = {**os.environ, "SIM_MODEL_LIMITS": '{"gpt-4o": {"rpm": 1}}'}
    log = tmp_path_factory.mktemp("strict") / "simulator.log"
    argv = [
        sys.executable,
        "-m",
        "devkit.simulator",
        "--port",
        str(port),
        "--latency-ms",
        "0",
        "--log-level",
        "warning",
        "--limit-rpm",
        "3",
        "--limit-tpm",
        "100000",
    ]
    proc = spawn("simulator", argv, env=env, log=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if not proc.alive() or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"simulator did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    try:
        yield url
    finally:
        proc.stop(10)


def test_requests_per_minute_with_openai_headers_and_429(limited_url: str) -> None:
    httpx.post(limited_url + "/_sim/reset")
    client = _sdk(limited_url + "/v1")
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=_prompt(), max_tokens=10)
    assert raw.parse().choices[0].message.content
    headers = raw.headers
    for name in LIMIT_HEADERS:
        assert name in headers, name
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "2"
    assert headers["x-ratelimit-limit-tokens"] == "100000"
    prompt_tokens = raw.parse().usage.prompt_tokens  # type: ignore[union-attr]
    # Counted on arrival as OpenAI does: prompt estimate + max_tokens.
    assert int(headers["x-ratelimit-remaining-tokens"]) == 100000 - prompt_tokens - 10
    assert GO_DURATION.match(headers["x-ratelimit-reset-requests"])
    assert GO_DURATION.match(headers["x-ratelimit-reset-tokens"])

    # A stream carries the same headers on its response.
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=_prompt(), stream=True
    ) as response:
        assert response.headers["x-ratelimit-remaining-requests"] == "1"
        assert "x-ratelimit-reset-tokens" in response.headers
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
    assert text.startswith("Simulated answer")

    client.chat.completions.create(model=MODEL, messages=_prompt())
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=_prompt())
    error = info.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.type == "requests"
    body = error.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] is None
    message = body["error"]["message"]
    assert message.startswith(f"Rate limit reached for {MODEL} in organization ")
    assert "on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in " in message
    wait = re.search(r"Please try again in (\S+)\.$", message)
    assert wait is not None
    assert GO_DURATION.match(wait.group(1))
    retry_ms = int(error.response.headers["retry-after-ms"])
    # 3 per minute: the next request is due in up to 20 s (less the little time the test took).
    assert 10_000 < retry_ms <= 20_000
    assert int(error.response.headers["retry-after"]) == -(-retry_ms // 1000)
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"

    # Another model has its own budget; gpt-4o has its own override (1 per minute) from SIM_MODEL_LIMITS.
    other = client.chat.completions.with_raw_response.create(model="gpt-4.1", messages=_prompt())
    assert other.headers["x-ratelimit-remaining-requests"] == "2"
    first = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=_prompt())
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o", messages=_prompt())

    stats = httpx.get(limited_url + "/_sim/stats", params={"queries": "0"}).json()
    assert stats["rate_limited"][MODEL] == {"requests": 1, "tokens": 0, "concurrency": 0}
    assert stats["rate_limited"]["gpt-4o"]["requests"] == 1
    assert stats["rate_limited_calls"] == 2
    # Rate-limit 429s are not random faults.
    assert stats["faults"]["429"] == 0
    assert stats["completed_calls"] == 5


def test_reset_refills_the_buckets(limited_url: str) -> None:
    client = _sdk(limited_url + "/v1")
    httpx.post(limited_url + "/_sim/reset")
    for _ in range(3):
        client.chat.completions.create(model="gpt-4.1-nano", messages=_prompt())
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4.1-nano", messages=_prompt())
    assert httpx.post(limited_url + "/_sim/reset").status_code == 200
    assert client.chat.completions.create(model="gpt-4.1-nano", messages=_prompt()).choices
    assert httpx.get(limited_url + "/_sim/stats").json()["rate_limited"] == {}


def test_tokens_per_minute_and_request_too_large() -> None:
    config = SimulatorConfig(port=0, latency_ms=0, limit_tpm=100)
    with run_in_thread(config) as sim:
        client = _sdk(sim.base_url)
        messages: list[Any] = [{"role": "user", "content": "x" * 40}]  # 10 prompt tokens
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=50)
        assert raw.headers["x-ratelimit-remaining-tokens"] == "40"
        assert raw.headers["x-ratelimit-limit-tokens"] == "100"
        # Only the limited dimension is advertised.
        assert "x-ratelimit-limit-requests" not in raw.headers

        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=50)
        assert info.value.type == "tokens"
        assert info.value.code == "rate_limit_exceeded"
        message = info.value.response.json()["error"]["message"]
        used = re.search(
            r"on tokens per min \(TPM\): Limit 100, Used (\d+), Requested 60\. Please try again in ", message
        )
        assert used is not None
        # About 20 tokens short at 100/min: up to 12 s (less what came back while the test ran).
        retry_ms = int(info.value.response.headers["retry-after-ms"])
        assert 6_000 < retry_ms <= 12_000
        assert 50 < int(used.group(1)) <= 60
        assert int(info.value.response.headers["retry-after"]) == -(-retry_ms // 1000)

        # Without max_tokens the simulator counts the answer it writes (16 tokens by default), per model.
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4.1", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-ratelimit-remaining-tokens"] == str(100 - 1 - 16)

        # An injected 429 carries the model's real limits.
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(
                model="gpt-4.1-mini", messages=[{"role": "user", "content": "[[sim fail=429 retry_after=1]]"}]
            )
        assert info.value.response.headers["x-ratelimit-limit-tokens"] == "100"
        assert "x-ratelimit-limit-requests" not in info.value.response.headers

        # A request larger than the whole per-minute limit can never run: no Retry-After.
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=500)
        assert info.value.type == "tokens"
        assert info.value.response.json()["error"]["message"].startswith("Request too large for gpt-4o")
        assert "retry-after" not in info.value.response.headers
        assert sim.app.stats.rate_limited == {
            MODEL: {"requests": 0, "tokens": 1, "concurrency": 0},
            "gpt-4o": {"requests": 0, "tokens": 1, "concurrency": 0},
        }


def test_short_burst_refills_continuously() -> None:
    # 12/min with a 5 s burst holds one request and gives one back every 5 s.
    config = SimulatorConfig(port=0, latency_ms=0, limit_rpm=12, limit_burst_seconds=5)
    with run_in_thread(config) as sim:
        client = _sdk(sim.base_url)
        client.chat.completions.create(model=MODEL, messages=_prompt())
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=MODEL, messages=_prompt())
        retry_ms = int(info.value.response.headers["retry-after-ms"])
        assert 0 < retry_ms <= 5000
        assert int(info.value.response.headers["retry-after"]) == -(-retry_ms // 1000)
        time.sleep(retry_ms / 1000 + 0.05)
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=_prompt())
        assert raw.headers["x-ratelimit-limit-requests"] == "12"
        assert raw.headers["x-ratelimit-remaining-requests"] == "0"


def test_concurrency_limit_is_a_429_and_slots_come_back() -> None:
    config = SimulatorConfig(port=0, latency_ms=1500, limit_concurrency=2)
    with run_in_thread(config) as sim:

        async def burst() -> tuple[Any, ...]:
            async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="k", max_retries=0, timeout=10) as sdk:

                async def call(delay: float) -> Any:
                    await asyncio.sleep(delay)
                    return await sdk.chat.completions.create(model=MODEL, messages=_prompt())

                # The third call arrives while the first two are still running.
                return await asyncio.gather(call(0), call(0), call(0.5), return_exceptions=True)

        results = asyncio.run(burst())
        errors = [r for r in results if isinstance(r, Exception)]
        assert len(errors) == 1
        error = errors[0]
        assert isinstance(error, openai.RateLimitError)
        assert error.type == "requests"
        assert "on concurrent requests: Limit 2, Used 2, Requested 1." in error.response.json()["error"]["message"]
        # The hint is the simulator's latency: about when a slot frees up.
        assert error.response.headers["retry-after-ms"] == "1500"
        assert error.response.headers["retry-after"] == "2"
        assert sim.app.stats.rate_limited[MODEL]["concurrency"] == 1
        # Finished calls gave their slots back.
        client = _sdk(sim.base_url)
        assert client.chat.completions.create(model=MODEL, messages=_prompt()).choices


def test_failed_calls_release_their_concurrency_slot() -> None:
    config = SimulatorConfig(port=0, latency_ms=0, limit_concurrency=1)
    with run_in_thread(config) as sim:
        client = _sdk(sim.base_url)
        for _ in range(3):
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(model=MODEL, messages=_prompt("[[sim fail=500]]"))
        assert client.chat.completions.create(model=MODEL, messages=_prompt()).choices
        assert sim.app.stats.rate_limited == {}


def test_limits_are_off_by_default_and_live_configurable() -> None:
    with run_in_thread(SimulatorConfig(port=0, latency_ms=0)) as sim:
        client = _sdk(sim.base_url)
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=_prompt())
        assert not [name for name in raw.headers if name.startswith("x-ratelimit-")]
        # An injected 429 does not make up limits either: a client learning limits from headers learns none.
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=MODEL, messages=_prompt("[[sim fail=429 retry_after=1]]"))
        assert info.value.response.headers["retry-after"] == "1"
        assert not [name for name in info.value.response.headers if name.startswith("x-ratelimit-")]

        updated = httpx.post(sim.url + "/_sim/config", json={"limit_rpm": 1, "model_limits": {"gpt-4o": {"rpm": 0}}})
        assert updated.status_code == 200
        assert updated.json()["limit_rpm"] == 1
        client.chat.completions.create(model=MODEL, messages=_prompt())
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=_prompt())
        # The override lifts the limit for one model.
        for _ in range(3):
            client.chat.completions.create(model="gpt-4o", messages=_prompt())

        for bad in (
            {"limit_rpm": -1},
            {"limit_tpm": 1.5},
            {"limit_burst_seconds": 0},
            {"model_limits": {"gpt-4o": {"rps": 1}}},
            {"model_limits": {"gpt-4o": {"rpm": -3}}},
            {"model_limits": "not json"},
        ):
            response = httpx.post(sim.url + "/_sim/config", json=bad)
            assert response.status_code == 400, bad
            assert response.json()["error"]["type"] == "invalid_request_error"
        assert httpx.get(sim.url + "/_sim/config").json()["limit_rpm"] == 1


def test_limits_from_environment_and_command_line() -> None:
    env = {"SIM_LIMIT_RPM": "3000", "SIM_LIMIT_CONCURRENCY": "8", "SIM_MODEL_LIMITS": '{"m": {"tpm": 5}}'}
    config = config_from_args(build_parser(env).parse_args(["--limit-tpm", "90000"]))
    assert (config.limit_rpm, config.limit_tpm, config.limit_concurrency) == (3000, 90000, 8)
    assert config.limits_for("m").tpm == 5
    assert config.limits_for("m").rpm == 3000
    assert config.limits_for("other").tpm == 90000
    argv = ["--model-limits", '{"gpt-4o": {"rpm": 10, "concurrency": 2}}']
    config = config_from_args(build_parser({}).parse_args(argv))
    assert config.model_limits == {"gpt-4o": {"rpm": 10, "concurrency": 2}}
    assert not config.limits_for("gpt-4o-mini").enabled
    with pytest.raises(ConfigError):
        SimulatorConfig(limit_rpm=-1)
    with pytest.raises(ConfigError):
        SimulatorConfig(model_limits='{"m": {"rpm": true}}')  # type: ignore[arg-type]
    with pytest.raises(SystemExit):
        build_parser({"SIM_LIMIT_RPM": "lots"})


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (0.0201, "21ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (17.426, "17.426s"),
        (360, "6m0s"),
        (61.25, "1m1.25s"),
        (3600, "1h0m0s"),
    ],
)
def test_go_durations(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text
