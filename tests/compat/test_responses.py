"""The `/v1` door driven by the official `openai` SDK: models, Responses, chat completions, errors."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy.engine import Engine

from tests.compat.conftest import make_api_key
from tests.support.api import register_and_login
from tests.support.db import count_rows
from tests.support.limits import tight_apis
from tests.support.stack import Stack, spawn_api, stop


def _until_terminal(sdk: openai.OpenAI, response_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        response = sdk.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress") or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_models_lists_the_allowed_models_and_an_unknown_one_is_not_found(sdk: openai.OpenAI) -> None:
    assert [m.id for m in sdk.models.list()] == ["sim-small", "sim-large"]
    assert sdk.models.retrieve("sim-large").id == "sim-large"
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.models.retrieve("gpt-nonexistent")
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_a_bad_api_key_is_an_authentication_error_in_openais_shape(stack: Stack) -> None:
    bad = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="aiq_not-a-real-key", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    body = caught.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error"


def test_background_create_is_queued_at_once_then_retrieved_completed(sdk: openai.OpenAI) -> None:
    created = sdk.responses.create(
        model="sim-small",
        input="Say hello [[sim latency_ms=500]]",
        instructions="Be brief.",
        max_output_tokens=200,
        temperature=0.5,
        metadata={"ticket": "T-1"},
        background=True,
    )
    assert created.id.startswith("resp_")
    assert created.status == "queued"
    assert created.background is True
    done = _until_terminal(sdk, created.id)
    assert done.status == "completed"
    # Kept from the create, on every read (OpenAI's behaviour).
    assert done.background is True
    assert done.output_text
    assert done.instructions == "Be brief."
    assert done.metadata == {"ticket": "T-1"}
    assert done.usage is not None
    assert done.usage.total_tokens > 0
    assert done.output[0].type == "message"


def test_a_foreground_create_waits_and_takes_a_message_list(sdk: openai.OpenAI, client: httpx.Client) -> None:
    response = sdk.responses.create(
        model="sim-large",
        input=[
            {"role": "developer", "content": "Answer in one word."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": [{"type": "input_text", "text": "Another one."}]},
        ],
    )
    assert response.status == "completed"
    assert response.output_text
    assert response.instructions == "Answer in one word."
    assert response.model == "sim-large"
    assert response.background is False
    assert sdk.responses.retrieve(response.id).background is False


@pytest.mark.anyio
async def test_the_async_client_creates_and_retrieves_a_background_response(async_sdk: openai.AsyncOpenAI) -> None:
    created = await async_sdk.responses.create(model="sim-small", input="async hello", background=True)
    assert created.status == "queued"
    deadline = time.monotonic() + 60
    response = await async_sdk.responses.retrieve(created.id)
    while response.status in ("queued", "in_progress") and time.monotonic() < deadline:
        response = await async_sdk.responses.retrieve(created.id)
    assert response.status == "completed"
    assert response.output_text


def test_cancel_is_idempotent(sdk: openai.OpenAI) -> None:
    created = sdk.responses.create(model="sim-small", input="slow one [[sim latency_ms=20000]]", background=True)
    first = sdk.responses.cancel(created.id)
    assert first.status == "cancelled"
    assert first.background is True
    again = sdk.responses.cancel(created.id)
    assert again.status == "cancelled"
    assert again.id == created.id
    assert again.background is True
    retrieved = sdk.responses.retrieve(created.id)
    assert retrieved.status == "cancelled"
    assert retrieved.background is True
    sdk.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(created.id)


def test_a_failed_query_is_a_failed_response_with_an_error(sdk: openai.OpenAI) -> None:
    created = sdk.responses.create(model="sim-small", input="refused [[sim fail=400]]", background=True)
    done = _until_terminal(sdk, created.id)
    assert done.status == "failed"
    assert done.error is not None
    assert "upstream_bad_request" in done.error.message


def test_another_users_response_and_a_malformed_id_are_not_found(
    sdk: openai.OpenAI, stack: Stack, client: httpx.Client
) -> None:
    created = sdk.responses.create(model="sim-small", input="mine", background=True)
    other_key = make_api_key(client, register_and_login(client))
    with openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=other_key, max_retries=0) as other:
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.cancel(created.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve("resp_not-hex")
    assert sdk.responses.retrieve(created.id).id == created.id


def test_invalid_input_is_a_bad_request_naming_the_param(sdk: openai.OpenAI, client: httpx.Client) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(model="sim-small", input="hi", temperature=5)
    assert caught.value.body["param"] == "temperature"  # type: ignore[index]
    assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(model="not-allowed", input="hi")
    assert caught.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="sim-small", messages=[{"role": "assistant", "content": "no user turn"}])
    assert caught.value.body["param"] == "messages"  # type: ignore[index]


def test_a_boolean_or_a_number_sent_as_another_type_is_a_bad_request_and_stores_nothing(
    stack: Stack, api_key: str, user: dict[str, Any], db: Engine
) -> None:
    chat = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]}
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/v1/chat/completions", {**chat, "stream": "true"}, "stream"),
        ("/v1/chat/completions", {**chat, "stream": 1}, "stream"),
        ("/v1/chat/completions", {**chat, "store": "yes"}, "store"),
        ("/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": "1"}}, "stream_options"),
        ("/v1/responses", {"model": "sim-small", "input": "hi", "stream": "true"}, "stream"),
        ("/v1/responses", {"model": "sim-small", "input": "hi", "background": "false"}, "background"),
        ("/v1/responses", {"model": "sim-small", "input": "hi", "store": 1}, "store"),
    ]
    # A number sent as a boolean or a string, which OpenAI refuses too.
    numbers: list[tuple[str, dict[str, Any], str]] = [
        ("/v1/chat/completions", {**chat, "temperature": False}, "temperature"),
        ("/v1/chat/completions", {**chat, "max_completion_tokens": "10"}, "max_completion_tokens"),
        ("/v1/responses", {"model": "sim-small", "input": "hi", "temperature": "0.5"}, "temperature"),
        ("/v1/responses", {"model": "sim-small", "input": "hi", "max_output_tokens": True}, "max_output_tokens"),
    ]
    before = count_rows(db, "SELECT count(*) FROM queries WHERE user_id = :u", u=user["user_id"])
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as c:
        for path, body, param in cases:
            r = c.post(path, json=body)
            assert r.status_code == 400, (path, body, r.text)
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["param"].startswith(param), error
            assert "boolean" in error["message"], error
        for path, body, param in numbers:
            r = c.post(path, json=body)
            assert r.status_code == 400, (path, body, r.text)
            error = r.json()["error"]
            assert (error["type"], error["param"]) == ("invalid_request_error", param), error
            assert "valid" in error["message"], error
    assert count_rows(db, "SELECT count(*) FROM queries WHERE user_id = :u", u=user["user_id"]) == before


def test_chat_completions_wait_for_the_queue(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(
        model="sim-small",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        max_completion_tokens=300,
    )
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.total_tokens > 0
    # One row: the same query is readable as a response.
    same = sdk.responses.retrieve("resp_" + completion.id.removeprefix("chatcmpl-"))
    assert same.output_text == completion.choices[0].message.content


@pytest.mark.anyio
async def test_async_chat_completions_and_an_upstream_refusal(async_sdk: openai.AsyncOpenAI) -> None:
    completion = await async_sdk.chat.completions.create(
        model="sim-large", messages=[{"role": "user", "content": "async chat"}]
    )
    assert completion.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as caught:
        await async_sdk.chat.completions.create(
            model="sim-small", messages=[{"role": "user", "content": "bad [[sim fail=400]]"}]
        )
    assert caught.value.body["code"] == "upstream_bad_request"  # type: ignore[index]


def test_a_refused_submit_is_a_rate_limit_error_with_the_retry_headers(
    stack: Stack, tmp_path: Path, client: httpx.Client, api_key: str
) -> None:
    with tight_apis(stack, tmp_path, 1, LIMIT_REQUESTS_PER_MINUTE="1", LIMIT_MAX_PENDING="0") as (url,):
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
        with sdk:
            sdk.responses.create(model="sim-small", input="first", background=True)
            with pytest.raises(openai.RateLimitError) as caught:
                sdk.responses.create(model="sim-small", input="second", background=True)
    headers = caught.value.response.headers
    assert float(headers["retry-after"]) > 0
    assert int(headers["retry-after-ms"]) == int(float(headers["retry-after"]) * 1000)
    assert caught.value.body["code"] == "rate_limited"  # type: ignore[index]


def test_a_foreground_call_past_compat_wait_is_a_504_naming_the_response_to_fetch(
    stack: Stack, tmp_path: Path, api_key: str
) -> None:
    # An API process of the stack's own queue, whose foreground calls wait one second at most.
    api, url = spawn_api(stack, tmp_path / "api.log", COMPAT_WAIT_SECONDS="1")
    try:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30)
        with sdk:
            # Past the 1 s wait, well within the stack's LLM_TIMEOUT_SECONDS=3 (a 3 s answer raced the timeout).
            with pytest.raises(openai.InternalServerError) as caught:
                sdk.chat.completions.create(
                    model="sim-small", messages=[{"role": "user", "content": "[[sim latency_ms=2000]] slow"}]
                )
            assert caught.value.status_code == 504
            response_id = caught.value.body["message"].split("GET /v1/responses/")[1]  # type: ignore[index]
            done = _until_terminal(sdk, response_id)
            assert done.status == "completed", done.error
    finally:
        stop(api)


def test_an_access_token_works_and_once_logged_out_the_creates_refuse_it_storing_nothing(
    stack: Stack, client: httpx.Client, db: Engine
) -> None:
    # The creates read an access token's revocation state with the submit's limits, in one round trip (as the
    # native submit does): a token that was logged out is refused all the same, before anything is stored,
    # waited for or streamed.
    caller = register_and_login(client)
    sdk = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=caller["tokens"]["access_token"], max_retries=0)
    messages: Any = [{"role": "user", "content": "Say hello"}]
    with sdk:
        assert sdk.chat.completions.create(model="sim-small", messages=messages).choices[0].message.content
        with sdk.chat.completions.create(model="sim-small", messages=messages, stream=True) as stream:
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert sdk.responses.create(model="sim-small", input="Say hello").status == "completed"
        stored = "SELECT count(*) FROM queries WHERE user_id = :u"
        before = count_rows(db, stored, u=caller["user_id"])
        assert before == 3
        logout = client.post("/api/v1/auth/logout", headers=caller["headers"])
        assert logout.status_code == 204
        creates = (
            lambda: sdk.chat.completions.create(model="sim-small", messages=messages),
            lambda: sdk.chat.completions.create(model="sim-small", messages=messages, stream=True),
            lambda: sdk.responses.create(model="sim-small", input="Say hello"),
            lambda: sdk.responses.create(model="sim-small", input="Say hello", background=True),
            lambda: sdk.responses.create(model="sim-small", input="Say hello", stream=True),
        )
        for create in creates:
            with pytest.raises(openai.AuthenticationError) as caught:
                create()
            assert caught.value.code == "token_revoked"
    assert count_rows(db, stored, u=caller["user_id"]) == before
