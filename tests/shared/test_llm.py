"""Backoff, Retry-After parsing, reading a streamed body and classifying its failures (pure logic)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx2
import openai
import orjson
import pytest

from shared import llm
from shared.config import Settings
from shared.llm import backoff_seconds, retry_after_seconds

SETTINGS = Settings(retry_base_seconds=1, retry_max_seconds=30, jwt_secret_key="s" * 48)  # type: ignore[arg-type]


def test_backoff_grows_exponentially_within_equal_jitter_bounds() -> None:
    rng = random.Random(7)
    for attempt, ceiling in ((1, 1), (2, 2), (3, 4), (4, 8), (6, 30), (20, 30)):
        for _ in range(50):
            delay = backoff_seconds(SETTINGS, attempt, None, rng)
            assert ceiling / 2 <= delay <= ceiling


def test_backoff_is_jittered() -> None:
    rng = random.Random(1)
    assert len({round(backoff_seconds(SETTINGS, 3, None, rng), 6) for _ in range(20)}) > 10


def test_backoff_never_undercuts_retry_after() -> None:
    assert backoff_seconds(SETTINGS, 1, 12.5, random.Random(0)) == 12.5
    # An absurd Retry-After is capped instead of parking the query for days.
    assert backoff_seconds(SETTINGS, 1, 10**6, random.Random(0)) == 300


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"retry-after": "3"}) == 3
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"retry-after": "soon"}) is None
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    parsed = retry_after_seconds({"retry-after": when})
    assert parsed is not None
    assert 15 < parsed <= 20


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


@pytest.mark.anyio
async def test_stream_events_are_read_across_chunk_boundaries_and_line_endings() -> None:
    body = (
        b'data: {"a":1}\n\n',
        b'data: {"b"',
        b":2}\r\n\r\n: comment\n\ndata: line one\ndata: line two\n\n",
        b"data: [DONE]\n\n",
    )
    got = [d async for d in llm._sse_data(_chunks(*body))]
    assert got == [b'{"a":1}', b'{"b":2}', b"line one\nline two", b"[DONE]"]


def test_a_stream_cut_after_its_headers_is_a_transient_connection_failure() -> None:
    failure = llm.classify(httpx2.ReadError("peer closed"))
    assert (failure.kind, failure.code, failure.transient) == ("connection", "upstream_unreachable", True)
    bad = llm.classify(orjson.JSONDecodeError("bad", "{", 0))
    assert (bad.code, bad.transient) == ("upstream_invalid_response", True)


def _answer(request: httpx2.Request) -> httpx2.Response:
    if orjson.loads(request.content).get("stream"):
        chunks = (
            b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n'
            b"data: [DONE]\n\n"
        )
        return httpx2.Response(200, content=chunks, headers={"content-type": "text/event-stream"})
    answer = {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    return httpx2.Response(200, json=answer)


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [True, False])
async def test_the_skipped_sdk_transform_is_the_sdks_own_result_for_every_call_complete_makes(
    monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    from openai._utils import async_maybe_transform as sdk_transform
    from openai.resources.chat.completions import completions

    client = llm.make_client(SETTINGS)  # installs the skip
    await client.close()
    skipping = completions.async_maybe_transform  # type: ignore[attr-defined]
    compared: list[bool] = []

    async def both(data: object, expected_type: object) -> object:
        ours = await skipping(data, expected_type)
        assert llm._identity_body(data) is not None
        compared.append(ours == await sdk_transform(data, expected_type))
        return ours

    monkeypatch.setattr(completions, "async_maybe_transform", both)
    client = openai.AsyncOpenAI(
        api_key="k",
        base_url="http://provider.test/v1",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(_answer)),
    )
    conversation = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    calls = [(None, None, None, None), ("Be brief.", 0.2, 64, None), ("", 1, 1, None), ("Be.", 1, 8, conversation)]
    for system, temperature, max_tokens, history in calls:
        done = await llm.complete(
            client,
            model="gpt-4o-mini",
            prompt="What is a queue?",
            system=system,
            temperature=temperature,
            max_tokens=max_tokens,
            headers={"X-AIQ-Attempt": "1"},
            history=history,
            stream=stream,
        )
        assert (done.text, done.total_tokens) == ("hi", 4)
    await client.close()
    assert compared == [True, True, True, True]


def test_bodies_complete_never_sends_go_through_the_sdks_transform() -> None:
    plain = {"model": "m", "messages": [{"role": "user", "content": "q"}], "stream": openai.omit}
    assert llm._identity_body(plain) == {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    parts = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]}
    tools = {"model": "m", "messages": [{"role": "user", "content": "q"}], "tools": []}
    named = {"model": "m", "messages": [{"role": "user", "content": "q", "name": "n"}]}
    options = {"model": "m", "messages": [], "stream_options": {"include_usage": True, "x": 1}}
    assert [llm._identity_body(b) for b in (parts, tools, named, options)] == [None] * 4
