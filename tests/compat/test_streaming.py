"""Streaming through the `/v1` door with the official `openai` SDK: Responses events with `sequence_number`,
resume with `starting_after`, chat completion chunks."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from devkit.procs import free_port
from tests.support.api import register_and_login, send_and_leave
from tests.support.asgi import in_process_api, serve_to_a_gone_client
from tests.support.db import row
from tests.support.limits import key_prefix, limits_redis, make_admin
from tests.support.polling import wait_until
from tests.support.stack import Stack, idle_api, metric_value, spawn_api, spawn_worker, stop


def _text(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_a_streamed_response_tells_every_step_in_numbered_order(sdk: openai.OpenAI) -> None:
    stream = sdk.responses.create(model="sim-small", input="[[sim tokens=80 chunk_ms=5]] tell me", stream=True)
    events = list(stream)
    types = [e.type for e in events]
    assert types[0] == "response.created"
    assert "response.in_progress" in types
    assert types.index("response.output_item.added") < types.index("response.output_text.delta")
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.status == "completed"
    assert final.output_text
    assert _text(events) == final.output_text
    assert sdk.responses.retrieve(final.id).output_text == final.output_text


def test_a_dropped_stream_resumes_after_the_last_event_seen(sdk: openai.OpenAI) -> None:
    stream = sdk.responses.create(
        model="sim-small", input="[[sim tokens=120 chunk_ms=20]] resumable", background=True, stream=True
    )
    seen: list[Any] = []
    for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta" and len(seen) >= 6:
            break
    stream.close()
    response_id = seen[0].response.id
    assert seen[0].response.background is True
    last = seen[-1].sequence_number
    rest = list(sdk.responses.retrieve(response_id, stream=True, starting_after=last))
    assert rest[0].sequence_number == last + 1
    assert [e.sequence_number for e in rest] == list(range(last + 1, last + 1 + len(rest)))
    assert rest[-1].type == "response.completed"
    # The resumed stream (a plain retrieve) still says how the response was created.
    assert rest[-1].response.background is True
    assert _text(seen) + _text(rest) == rest[-1].response.output_text
    # Resuming again from the start gives the same events, numbered the same.
    again = list(sdk.responses.retrieve(response_id, stream=True))
    assert [(e.sequence_number, e.type) for e in again][last + 1 :] == [(e.sequence_number, e.type) for e in rest]


def test_a_failed_response_streams_response_failed(sdk: openai.OpenAI) -> None:
    events = list(sdk.responses.create(model="sim-small", input="[[sim fail=400]] no", stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"
    assert events[-1].response.error is not None


def test_streamed_chat_completion_chunks_end_with_the_finish_reason_and_usage(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model="sim-small",
            messages=[{"role": "user", "content": "[[sim tokens=50 chunk_ms=5]] stream it"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens > 0
    same = sdk.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "x"}])
    assert same.choices[0].message.content


@pytest.mark.anyio
async def test_async_streams_and_an_upstream_refusal_mid_stream(async_sdk: openai.AsyncOpenAI) -> None:
    stream = await async_sdk.chat.completions.create(
        model="sim-large", messages=[{"role": "user", "content": "[[sim tokens=30]] async"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text
    refused = await async_sdk.chat.completions.create(
        model="sim-small", messages=[{"role": "user", "content": "[[sim fail=400]] bad"}], stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        async for _ in refused:
            pass
    assert "upstream_bad_request" in str(caught.value)
    events = [e async for e in await async_sdk.responses.create(model="sim-small", input="async", stream=True)]
    assert events[-1].type == "response.completed"


def test_a_stream_over_the_users_cap_is_a_rate_limit_error_and_stores_nothing(
    stack: Stack, tmp_path: Path, api_key: str, user: dict[str, Any], db: Engine
) -> None:
    api, url = spawn_api(stack, tmp_path / "api.log", MAX_STREAMS_PER_USER="1")
    try:
        capped = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60)
        with capped:
            first = capped.responses.create(model="sim-small", input="[[sim latency_ms=3000]] slow", stream=True)
            with first:
                assert next(iter(first)).type == "response.created"
                stored = _query_count(db, user["user_id"])
                with pytest.raises(openai.RateLimitError) as caught:
                    capped.chat.completions.create(
                        model="sim-small", messages=[{"role": "user", "content": "x"}], stream=True
                    )
                assert caught.value.body["code"] == "too_many_streams"  # type: ignore[index]
                assert _query_count(db, user["user_id"]) == stored
    finally:
        stop(api)


def test_a_chat_stream_left_before_its_body_gives_its_slot_back_at_once(
    stack: Stack, tmp_path: Path, api_key: str, user: dict[str, Any]
) -> None:
    metrics_port = free_port()
    api, url = spawn_api(stack, tmp_path / "api.log", MAX_STREAMS_PER_USER="1", API_METRICS_PORT=str(metrics_port))
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        body = {
            "model": "sim-small",
            "messages": [{"role": "user", "content": "[[sim latency_ms=3000]] left at once"}],
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        send_and_leave(url, "POST", "/v1/chat/completions", headers, orjson.dumps(body))
        # Handled to its end (counted; the query was stored and is being answered), and its slot is free again.
        wait_until(lambda: metric_value(metrics, "aiq_http_requests_total", route="/v1/chat/completions") >= 1)
        with limits_redis(stack) as r:
            wait_until(lambda: r.zcard(f"{key_prefix(stack.settings.queue_name)}streams:{user['user_id']}") == 0, 2)
        assert metric_value(metrics, "aiq_sse_streams_open") == 0
        with openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30) as capped:
            chunks = list(
                capped.chat.completions.create(
                    model="sim-small", messages=[{"role": "user", "content": "next"}], stream=True
                )
            )
        assert chunks[-1].choices[0].finish_reason == "stop"
    finally:
        stop(api)


@pytest.mark.anyio
async def test_a_chat_stream_whose_body_never_starts_still_gives_its_slot_back(
    stack: Stack, api_key: str, user: dict[str, Any]
) -> None:
    # An ASGI 2.4 server's `send` raises once the client is gone: the body never runs its own release.
    body = orjson.dumps({"model": "sim-small", "messages": [{"role": "user", "content": "never told"}], "stream": True})
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    async with in_process_api(stack.settings.model_copy(update={"max_streams_per_user": 1})) as app:
        await serve_to_a_gone_client(app, "POST", "/v1/chat/completions", headers, body)
    with limits_redis(stack) as r:
        assert r.zcard(f"{key_prefix(stack.settings.queue_name)}streams:{user['user_id']}") == 0


def _query_count(db: Engine, user_id: str) -> int:
    with db.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM queries WHERE user_id = :u"), {"u": user_id}).scalar_one())


def test_a_worker_sigkilled_mid_stream_still_ends_the_stream_with_the_stored_answer(
    sdk: openai.OpenAI, stack: Stack, db: Engine, tmp_path: Path
) -> None:
    # A second worker on the stack's queue; the response to follow is one it claimed. After the kill the
    # stack's own worker sweeps the expired lease and runs attempt 2, and the stream goes on to its end.
    victim, _ = spawn_worker(stack, tmp_path / "victim.log")
    try:
        # Either worker may take a query: submit until the extra one has.
        for _ in range(120):
            created = sdk.responses.create(
                model="sim-small", input="[[sim tokens=150 chunk_ms=30]] interrupted", background=True
            )
            query_id = str(uuid.UUID(hex=created.id.removeprefix("resp_")))
            owner = wait_until(lambda: row(db, query_id)["lease_owner"], timeout=20)  # noqa: B023
            if owner.endswith(f":{victim.pid}"):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the extra worker never claimed a query")
        seen: list[Any] = []
        for event in sdk.responses.retrieve(created.id, stream=True):
            seen.append(event)
            deltas = sum(e.type == "response.output_text.delta" for e in seen)
            if victim.poll() is None and deltas == 3:
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait(10)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(10)
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    assert seen[-1].type == "response.completed"
    stored = row(db, query_id)
    assert stored["attempts"] == 2
    assert seen[-1].response.output_text == stored["response"]
    done = next(e for e in seen if e.type == "response.output_text.done")
    assert done.text == stored["response"]


def _read_until_ended(stream: Any, act: Callable[[], None]) -> list[Any]:
    """Iterate an SDK stream, `act` at its first item, read on to its end: the items. The end must come from the
    credential re-check (once per 0.3 s keep-alive interval), not from the query or the client's timeout."""
    items: list[Any] = []
    acted_at = float("inf")
    with stream:
        for item in stream:
            items.append(item)
            if len(items) == 1:
                act()
                acted_at = time.monotonic()
    assert time.monotonic() - acted_at < 10
    return items


def test_revoking_its_key_ends_an_open_chat_completion_stream(
    stack: Stack, tmp_path: Path, api_key: str, user: dict[str, Any], client: httpx.Client
) -> None:
    with (
        idle_api(stack, tmp_path / "api.log") as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30) as sdk,
    ):
        stream = sdk.chat.completions.create(
            model="sim-small", messages=[{"role": "user", "content": "never picked up"}], stream=True
        )
        (key,) = client.get("/api/v1/keys", headers=user["headers"]).json()

        def revoke() -> None:
            assert client.delete(f"/api/v1/keys/{key['id']}", headers=user["headers"]).status_code == 204

        chunks = _read_until_ended(stream, revoke)
        # Only the opening chunk: no content, no finish_reason (the stream ends as one whose log ended early).
        assert [c.choices[0].delta.role for c in chunks] == ["assistant"]
        assert chunks[0].choices[0].finish_reason is None
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "x"}], stream=True)
        assert caught.value.body["code"] == "invalid_api_key"  # type: ignore[index]


def test_disabling_the_account_ends_an_open_responses_stream(
    stack: Stack, tmp_path: Path, api_key: str, user: dict[str, Any], client: httpx.Client, db: Engine
) -> None:
    admin = register_and_login(client)
    make_admin(db, admin["user_id"])
    with (
        idle_api(stack, tmp_path / "api.log") as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30) as sdk,
    ):
        stream = sdk.responses.create(model="sim-small", input="never picked up", stream=True)

        def disable() -> None:
            r = client.post(f"/api/v1/admin/users/{user['user_id']}/disable", headers=admin["headers"])
            assert r.status_code == 200, r.text

        events = _read_until_ended(stream, disable)
        assert events[0].type == "response.created"
        assert {e.type for e in events} <= {"response.created", "response.queued", "response.in_progress"}
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk.responses.retrieve(events[0].response.id)
        assert caught.value.body["code"] == "account_disabled"  # type: ignore[index]
