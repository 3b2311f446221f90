"""The LLM simulator as the worker sees it: a real HTTP server driven through the real openai SDK."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from devkit.procs import free_port, spawn
from devkit.simulator import SimulatorConfig, main, run_in_thread
from devkit.simulator.config import ConfigError, build_parser
from devkit.simulator.directives import DirectiveError, answer_text, parse_directives

MODEL = "gpt-4o-mini"


@pytest.fixture(scope="module")
def sim_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A simulator subprocess started exactly as `aiq simulate` would start it."""
    port = free_port()
    env = {**os.environ, "SIM_LATENCY_MS": "5"}
    log = tmp_path_factory.mktemp("simulator") / "simulator.log"
    argv = [sys.executable, "-m", "devkit.simulator", "--port", str(port), "--log-level", "warning"]
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


@pytest.fixture
def client(sim_url: str) -> Iterator[openai.OpenAI]:
    """A sync SDK client configured like the worker's (no SDK retries)."""
    with openai.OpenAI(base_url=sim_url + "/v1", api_key="sk-test", max_retries=0, timeout=5) as sdk:
        yield sdk


def _prompt(text: str = "") -> list[Any]:
    # A unique prefix keeps `times=N` counters of different tests apart on the shared server.
    return [{"role": "user", "content": f"{uuid.uuid4().hex} {text}"}]


def test_chat_completion(client: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a queue? [[sim tokens=20]]"},
    ]
    result = client.chat.completions.create(model="any-model-name", messages=messages)

    assert result.object == "chat.completion"
    assert result.id.startswith("chatcmpl-")
    assert result.model == "any-model-name"
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert choice.message.content is not None
    assert choice.message.content.startswith("Simulated answer (20 tokens) to a")
    assert len(choice.message.content.split()) == 20
    assert result.usage is not None
    chars = len("Be brief.") + len("What is a queue? [[sim tokens=20]]")
    assert result.usage.prompt_tokens == -(-chars // 4)
    assert result.usage.completion_tokens == 20
    assert result.usage.total_tokens == result.usage.prompt_tokens + 20
    # Deterministic: the same prompt gets the same answer.
    again = client.chat.completions.create(model="any-model-name", messages=messages)
    assert again.choices[0].message.content == choice.message.content


def test_max_tokens_caps_the_answer(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model=MODEL, messages=_prompt("[[sim tokens=50]]"), max_tokens=5)
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert result.usage.completion_tokens == 5
    assert result.choices[0].message.content == "Simulated answer (5 tokens) to"


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=_prompt("[[sim tokens=12]]"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text.startswith("Simulated answer (12 tokens)")
    assert len(text.split()) == 12
    assert chunks[-2].choices[0].finish_reason == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 12
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_streaming_wire_format(sim_url: str) -> None:
    body = {"model": MODEL, "messages": _prompt("[[sim tokens=3]]"), "stream": True}
    response = httpx.post(sim_url + "/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    # Without include_usage there is no usage key at all, as with OpenAI.
    assert all('"usage"' not in event for event in events)


def test_async_client_concurrent_calls(sim_url: str) -> None:
    async def run() -> tuple[list[str], str]:
        async with openai.AsyncOpenAI(base_url=sim_url + "/v1", api_key="k", max_retries=0, timeout=5) as sdk:
            results = await asyncio.gather(
                *(
                    sdk.chat.completions.create(
                        model=MODEL,
                        messages=_prompt(),
                        extra_headers={
                            "X-AIQ-Query-Id": f"async-{i}",
                            "X-AIQ-Attempt": "1",
                        },
                    )
                    for i in range(50)
                )
            )
            stream = await sdk.chat.completions.create(model=MODEL, messages=_prompt(), stream=True)
            streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        return [r.choices[0].message.content or "" for r in results], streamed

    answers, streamed = asyncio.run(run())
    assert len(answers) == 50
    assert all(a.startswith("Simulated answer") for a in answers)
    assert streamed.startswith("Simulated answer (16 tokens)")


@pytest.mark.parametrize(
    ("directive", "exception", "status"),
    [
        ("fail=500", openai.InternalServerError, 500),
        ("fail=400", openai.BadRequestError, 400),
        ("fail=401", openai.AuthenticationError, 401),
        ("fail=404", openai.NotFoundError, 404),
    ],
)
def test_status_faults(
    client: openai.OpenAI,
    directive: str,
    exception: type[openai.APIStatusError],
    status: int,
) -> None:
    with pytest.raises(exception) as info:
        client.chat.completions.create(model=MODEL, messages=_prompt(f"[[sim {directive}]]"))
    assert info.value.status_code == status
    body = info.value.body
    assert isinstance(body, dict)
    assert set(body) == {"message", "type", "param", "code"}


def test_rate_limit_carries_retry_after(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=_prompt("[[sim fail=429 retry_after=3]]"))
    assert info.value.response.headers["retry-after"] == "3"
    assert info.value.response.headers["retry-after-ms"] == "3000"
    assert info.value.code == "rate_limit_exceeded"


def test_quota_is_a_429_without_retry_after(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=_prompt("[[sim fail=quota]]"))
    assert info.value.code == "insufficient_quota"
    assert info.value.type == "insufficient_quota"
    assert "retry-after" not in info.value.response.headers


def test_drop_is_a_connection_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError) as info:
        client.chat.completions.create(model=MODEL, messages=_prompt("[[sim fail=drop]]"))
    assert not isinstance(info.value, openai.APITimeoutError)
    # The next call on the same client still works (the pool discards the dead connection).
    assert client.chat.completions.create(model=MODEL, messages=_prompt()).choices


def test_hang_times_out_and_is_released(client: openai.OpenAI, sim_url: str) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model=MODEL, messages=_prompt("[[sim fail=hang]]"), timeout=0.3)
    assert time.monotonic() - started < 3
    # The simulator notices the client giving up and stops holding the request.
    deadline = time.monotonic() + 3
    while httpx.get(sim_url + "/_sim/stats?queries=0").json()["in_flight"] != 0:
        assert time.monotonic() < deadline, "hung request still in flight after the client left"
        time.sleep(0.05)


def test_times_fails_first_n_identical_calls(client: openai.OpenAI) -> None:
    messages = _prompt("[[sim fail=500 times=2]]")
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=MODEL, messages=messages)
    assert client.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content
    # Another model makes another request, with its own count.
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o", messages=messages)


def test_latency_directive(client: openai.OpenAI) -> None:
    started = time.monotonic()
    client.chat.completions.create(model=MODEL, messages=_prompt("[[sim latency_ms=300]]"))
    assert time.monotonic() - started >= 0.3


def test_stats_count_calls_by_query_and_reset(client: openai.OpenAI, sim_url: str) -> None:
    assert httpx.post(sim_url + "/_sim/reset").status_code == 200
    for attempt in (1, 2, 3):
        headers = {"X-AIQ-Query-Id": "query-a", "X-AIQ-Attempt": str(attempt)}
        client.chat.completions.create(model=MODEL, messages=_prompt(), extra_headers=headers)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model=MODEL,
            messages=_prompt("[[sim fail=429]]"),
            extra_headers={"X-AIQ-Query-Id": "query-b"},
        )

    stats = httpx.get(sim_url + "/_sim/stats").json()
    assert stats["total_calls"] == 4
    assert stats["completed_calls"] == 3
    assert stats["faults"]["429"] == 1
    assert stats["calls_by_query"] == {"query-a": 3, "query-b": 1}
    assert stats["in_flight"] == 0
    assert stats["max_in_flight"] >= 1
    one = httpx.get(sim_url + "/_sim/stats", params={"query_id": "query-b"}).json()
    assert one["calls_by_query"] == {"query-b": 1}

    httpx.post(sim_url + "/_sim/reset")
    stats = httpx.get(sim_url + "/_sim/stats").json()
    assert stats["total_calls"] == 0
    assert stats["calls_by_query"] == {}
    assert set(stats["faults"].values()) == {0}


def test_live_config_switches_random_faults(client: openai.OpenAI, sim_url: str) -> None:
    before = httpx.get(sim_url + "/_sim/config").json()
    assert before["rate_500"] == 0
    assert before["latency_ms"] == 5
    try:
        updated = httpx.post(
            sim_url + "/_sim/config",
            json={"rate_429": 1, "retry_after_min": 2, "retry_after_max": 2},
        ).json()
        assert updated["rate_429"] == 1
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=MODEL, messages=_prompt())
        assert info.value.response.headers["retry-after"] == "2"
        # A `fail` directive is deterministic: random faults never override it.
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=MODEL, messages=_prompt("[[sim fail=500]]"))

        bad = httpx.post(sim_url + "/_sim/config", json={"rate_500": 2})
        assert bad.status_code == 400
        assert httpx.post(sim_url + "/_sim/config", json={"port": 1}).status_code == 400
    finally:
        restore = {k: before[k] for k in ("rate_429", "retry_after_min", "retry_after_max")}
        assert httpx.post(sim_url + "/_sim/config", json=restore).status_code == 200
    assert client.chat.completions.create(model=MODEL, messages=_prompt()).choices


@pytest.mark.parametrize(
    ("content", "param", "message"),
    [
        (b"{not json", None, "We could not parse the JSON body"),
        (
            b'{"messages": [{"role": "user", "content": "hi"}]}',
            None,
            "you must provide a model parameter",
        ),
        (
            b'{"model": "gpt-4o-mini"}',
            "messages",
            "Missing required parameter: 'messages'.",
        ),
        (b'{"model": "gpt-4o-mini", "messages": []}', "messages", "empty array"),
        (
            b'{"model": "m", "messages": [{"role": "robot", "content": "x"}]}',
            "messages[0].role",
            "Invalid value",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "[[sim fail=nope]]"}]}',
            "messages",
            "fail",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
            "max_tokens",
            ">= 1",
        ),
    ],
)
def test_invalid_requests(sim_url: str, content: bytes, param: str | None, message: str) -> None:
    response = httpx.post(
        sim_url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert message in error["message"]


def test_sdk_sees_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[])
    assert info.value.code == "empty_array"


def test_models_and_unknown_routes(client: openai.OpenAI, sim_url: str) -> None:
    models = [model.id for model in client.models.list()]
    assert MODEL in models
    assert client.models.retrieve("my-model").id == "my-model"
    response = httpx.get(sim_url + "/v1/nope")
    assert response.status_code == 404
    assert "error" in response.json()


def test_api_key_is_enforced_in_process() -> None:
    config = SimulatorConfig(port=0, latency_ms=0, api_key="sk-right-key-123456")
    with run_in_thread(config) as sim:
        good = openai.OpenAI(
            base_url=sim.base_url,
            api_key="sk-right-key-123456",
            max_retries=0,
            timeout=5,
        )
        assert good.chat.completions.create(model=MODEL, messages=_prompt()).choices

        bad = openai.OpenAI(
            base_url=sim.base_url,
            api_key="sk-wrong-key-999999",
            max_retries=0,
            timeout=5,
        )
        with pytest.raises(openai.AuthenticationError) as info:
            bad.chat.completions.create(model=MODEL, messages=_prompt())
        assert info.value.code == "invalid_api_key"
        assert "sk-wrong-key-999999" not in str(info.value)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()

        missing = httpx.post(
            sim.base_url + "/chat/completions",
            json={"model": MODEL, "messages": _prompt()},
        )
        assert missing.status_code == 401
        # Admin endpoints stay open so harnesses need no key.
        assert httpx.get(sim.url + "/_sim/stats").json()["faults"]["401"] == 2
        assert sim.app.stats.completed_calls == 1


@pytest.mark.parametrize("stream", [False, True])
def test_echo_messages_answers_with_the_messages_received_in_order(client: openai.OpenAI, stream: bool) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a queue?"},
        {"role": "assistant", "content": "A line of work."},
        {"role": "user", "content": [{"type": "text", "text": "And a stack? [[sim echo=messages]]"}]},
    ]
    if stream:
        chunks = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = client.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content or ""
    assert json.loads(text) == [
        ["system", "Be brief."],
        ["user", "What is a queue?"],
        ["assistant", "A line of work."],
        ["user", "And a stack? [[sim echo=messages]]"],
    ]
    with pytest.raises(DirectiveError):
        parse_directives("[[sim echo=headers]]")


def test_directive_parsing() -> None:
    parsed = parse_directives("hi [[sim fail=429 times=2 retry_after=1.5]] and [[sim tokens=7 latency_ms=0]]")
    assert (
        parsed.fail,
        parsed.times,
        parsed.retry_after,
        parsed.tokens,
        parsed.latency_ms,
    ) == (
        "429",
        2,
        "1.5",
        7,
        0.0,
    )
    assert parse_directives("no directives").fail is None
    for bad in (
        "[[sim fail=oops]]",
        "[[sim times=-1]]",
        "[[sim tokens]]",
        "[[sim colour=red]]",
    ):
        with pytest.raises(DirectiveError):
            parse_directives(bad)
    assert answer_text(0, 10, "x") == ""
    assert len(answer_text(100, 10, "x").split()) == 100


def test_cli_defaults_from_environment_and_validation() -> None:
    args = build_parser({"SIM_LATENCY_MS": "42", "SIM_RATE_500": "0.25", "SIM_API_KEY": "k"}).parse_args([])
    assert (args.latency_ms, args.rate_500, args.api_key, args.port) == (
        42.0,
        0.25,
        "k",
        8900,
    )
    assert build_parser({}).parse_args(["--port", "9000", "--seed", "7"]).seed == 7
    with pytest.raises(ConfigError):
        SimulatorConfig(rate_drop=1.5)
    with pytest.raises(ConfigError):
        SimulatorConfig(retry_after_min=5, retry_after_max=1)
    assert main(["--rate-429", "2"]) == 2
    assert main(["--no-such-flag"]) == 2
