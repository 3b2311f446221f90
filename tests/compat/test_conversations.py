"""`/v1` conversations reach the model as their messages (roles and order kept), through the queue.

The simulator's `[[sim echo=messages]]` directive answers with the messages it received, so each test reads
what the worker sent upstream from the answer itself.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
from sqlalchemy.engine import Engine

from shared.cache import request_digest
from tests.support.db import count_rows, row
from tests.support.limits import limits_redis
from tests.support.polling import wait_until
from tests.support.stack import Stack, sim_calls, spawn_api, stop

ECHO = "[[sim echo=messages]]"


def _query_id(public_id: str) -> str:
    return str(uuid.UUID(hex=public_id.split("-", 1)[1] if public_id.startswith("chatcmpl-") else public_id[5:]))


def _echoed(text: str | None) -> list[list[str]]:
    echoed: list[list[str]] = json.loads(text or "")
    return echoed


def test_a_chat_conversation_reaches_the_model_as_separate_messages_in_order(
    sdk: openai.OpenAI, client: httpx.Client, user: dict[str, Any], db: Engine
) -> None:
    final = f"And a third one? {ECHO} {uuid.uuid4().hex}"
    completion = sdk.chat.completions.create(
        model="sim-small",
        messages=[
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": [{"type": "text", "text": "Another one."}]},
            {"role": "assistant", "content": "Green."},
            {"role": "user", "content": final},
        ],
        max_completion_tokens=300,
    )
    assert _echoed(completion.choices[0].message.content) == [
        ["system", "Answer in one word."],
        ["user", "Name a colour."],
        ["assistant", "Blue."],
        ["user", "Another one."],
        ["assistant", "Green."],
        ["user", final],
    ]
    query_id = _query_id(completion.id)
    stored = row(db, query_id)
    # The row keeps the final user message as its prompt and the turns before it as its history.
    assert stored["prompt"] == final
    assert stored["system"] == "Answer in one word."
    assert stored["history"] == [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one."},
        {"role": "assistant", "content": "Green."},
    ]
    # The token reservation counts every turn the model reads, not only the last.
    chars = len("Answer in one word.") + len("Name a colour.Blue.Another one.Green.") + len(final)
    assert stored["reserved_tokens"] == math.ceil(chars / 4) + 300
    # The native read of the same query shows its final message as `query`, and no history.
    native = client.get(f"/api/v1/query/{query_id}", headers=user["headers"])
    assert native.status_code == 200, native.text
    assert native.json()["query"] == final
    assert "history" not in native.json()


def test_participant_names_reach_the_model_with_their_messages(sdk: openai.OpenAI, db: Engine) -> None:
    final = f"Who spoke first? {ECHO} {uuid.uuid4().hex}"
    completion = sdk.chat.completions.create(
        model="sim-small",
        messages=[
            {"role": "system", "content": "Keep track of who says what.", "name": "house_rules"},
            {"role": "user", "content": "I like tea.", "name": "alice"},
            {"role": "assistant", "content": "Noted, Alice.", "name": "butler"},
            {"role": "user", "content": "I like coffee."},
            {"role": "user", "content": final, "name": "bob"},
        ],
    )
    # Each user and assistant turn keeps its name; a turn without one has none. System text is merged into the
    # system prompt, which has no participant.
    assert _echoed(completion.choices[0].message.content) == [
        ["system", "Keep track of who says what."],
        ["user", "I like tea.", "alice"],
        ["assistant", "Noted, Alice.", "butler"],
        ["user", "I like coffee."],
        ["user", final, "bob"],
    ]
    stored = row(db, _query_id(completion.id))
    assert stored["prompt_name"] == "bob"
    assert stored["history"][:2] == [
        {"role": "user", "content": "I like tea.", "name": "alice"},
        {"role": "assistant", "content": "Noted, Alice.", "name": "butler"},
    ]
    # A name is part of what the model reads, so of what the response cache compares.
    plain = request_digest("sim-small", None, final, None, None, stored["history"])
    assert request_digest("sim-small", None, final, None, None, stored["history"], "bob") != plain
    assert request_digest("sim-small", None, final, None, None, stored["history"], None) == plain


def test_a_streamed_chat_conversation_is_sent_as_messages_too(sdk: openai.OpenAI) -> None:
    chunks = sdk.chat.completions.create(
        model="sim-small",
        messages=[
            {"role": "user", "content": "Hello."},
            {"role": "assistant", "content": "Hi, how can I help?"},
            {"role": "user", "content": f"Tell me a joke. {ECHO}"},
        ],
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert _echoed(text) == [
        ["user", "Hello."],
        ["assistant", "Hi, how can I help?"],
        ["user", f"Tell me a joke. {ECHO}"],
    ]


def test_a_responses_input_list_reaches_the_model_as_separate_messages_in_order(sdk: openai.OpenAI, db: Engine) -> None:
    final = f"Another one. {ECHO}"
    # An assistant turn as the SDK sends back an earlier response's output message.
    conversation: list[Any] = [
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Blue.", "annotations": []}]},
        {"role": "user", "content": [{"type": "input_text", "text": final}]},
    ]
    response = sdk.responses.create(model="sim-large", instructions="Be brief.", input=conversation)
    assert response.status == "completed", response.error
    assert _echoed(response.output_text) == [
        ["system", "Be brief.\n\nAnswer in one word."],
        ["user", "Name a colour."],
        ["assistant", "Blue."],
        ["user", final],
    ]
    assert response.instructions == "Be brief.\n\nAnswer in one word."
    assert row(db, _query_id(response.id))["history"] == [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]


def test_a_single_message_stores_no_history(sdk: openai.OpenAI, db: Engine) -> None:
    completion = sdk.chat.completions.create(
        model="sim-small",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hello. {ECHO}"}],
    )
    assert _echoed(completion.choices[0].message.content) == [["system", "Be brief."], ["user", f"Hello. {ECHO}"]]
    response = sdk.responses.create(model="sim-small", input=[{"role": "user", "content": "Hi."}])
    for public_id in (completion.id, response.id):
        query_id = _query_id(public_id)
        # SQL NULL, not a JSON null nor an empty list.
        assert count_rows(db, "SELECT count(*) FROM queries WHERE id = :id AND history IS NULL", id=query_id) == 1


def test_the_cache_tells_two_conversations_with_the_same_last_message_apart(
    stack: Stack, api_key: str, db: Engine, tmp_path: Path
) -> None:
    # An API process of the stack's own queue (its worker answers) with the cache on by default.
    api, url = spawn_api(stack, tmp_path / "api-cache.log", RESPONSE_CACHE_DEFAULT="true")
    final = f"What did I say first? {ECHO} {uuid.uuid4().hex}"

    def ask(first: str) -> tuple[str, str]:
        messages: list[Any] = [
            {"role": "user", "content": first},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": final},
        ]
        completion = sdk.chat.completions.create(model="sim-small", messages=messages, max_completion_tokens=100)
        query_id = _query_id(completion.id)
        # The worker stores the answer in the cache with the query's end; wait until it has.
        r = limits_redis(stack)
        wait_until(lambda: not r.exists(f"aiq:{stack.settings.queue_name}:cache:intent:{query_id}"), timeout=10)
        return query_id, completion.choices[0].message.content or ""

    try:
        with openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60) as sdk:
            apples_id, apples = ask("I like apples.")
            pears_id, pears = ask("I like pears.")
            again_id, again = ask("I like apples.")
    finally:
        stop(api)
    assert _echoed(apples)[0] == ["user", "I like apples."]
    # Same last message, another conversation: a miss, answered by the model.
    assert _echoed(pears)[0] == ["user", "I like pears."]
    assert (row(db, pears_id)["cached"], sim_calls(stack, pears_id)) == (False, 1)
    # The same conversation again: answered from the cache, without a provider call.
    assert again == apples
    assert (row(db, again_id)["cached"], sim_calls(stack, again_id)) == (True, 0)
    assert row(db, apples_id)["cached"] is False


def test_a_conversation_over_the_size_limit_or_with_nul_is_a_bad_request_and_stores_nothing(
    stack: Stack, api_key: str, user: dict[str, Any], db: Engine
) -> None:
    limit, whole = stack.settings.max_query_chars, stack.settings.max_conversation_chars
    # Each message within MAX_QUERY_CHARS, the three together one over MAX_CONVERSATION_CHARS.
    turn = "x" * limit
    long_chat = [
        {"role": "user", "content": turn},
        {"role": "assistant", "content": turn},
        {"role": "user", "content": "x" * (whole - 2 * limit + 1)},
    ]
    assert all(len(m["content"]) <= limit for m in long_chat)
    cases: list[tuple[str, dict[str, Any], str, str | None]] = [
        ("/v1/chat/completions", {"model": "sim-small", "messages": long_chat}, "messages", "conversation_too_long"),
        ("/v1/responses", {"model": "sim-small", "input": long_chat}, "input", "conversation_too_long"),
        (
            "/v1/chat/completions",
            {
                "model": "sim-small",
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "a\x00b"},
                    {"role": "user", "content": "again"},
                ],
            },
            "messages",
            "nul_character",
        ),
        (
            "/v1/chat/completions",
            {"model": "sim-small", "messages": [{"role": "user", "content": "hi", "name": "a\x00b"}]},
            "messages",
            "nul_character",
        ),
        (
            "/v1/chat/completions",
            {"model": "sim-small", "messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "hi"}]},
            "messages.0.role",
            None,
        ),
        (
            "/v1/chat/completions",
            {"model": "sim-small", "messages": [*long_chat[:1], {"role": "assistant", "content": "a"}]},
            "messages",
            "invalid_value",
        ),
    ]
    before = count_rows(db, "SELECT count(*) FROM queries WHERE user_id = :u", u=user["user_id"])
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as c:
        for path, body, param, code in cases:
            r = c.post(path, json=body)
            assert r.status_code == 400, (path, r.text)
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["param"].startswith(param), error
            assert error["code"] == code, error
    assert count_rows(db, "SELECT count(*) FROM queries WHERE user_id = :u", u=user["user_id"]) == before
    # One character fewer: accepted, though well over MAX_QUERY_CHARS in all.
    within = [*long_chat[:2], {"role": "user", "content": "x" * (whole - 2 * limit)}]
    assert sum(len(m["content"]) for m in within) == whole > limit
    with openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=api_key, max_retries=0, timeout=60) as sdk:
        assert sdk.chat.completions.create(model="sim-small", messages=within).choices[0].message.content  # type: ignore[arg-type]


def test_deleting_a_conversation_erases_its_history(
    sdk: openai.OpenAI, client: httpx.Client, user: dict[str, Any], db: Engine
) -> None:
    completion = sdk.chat.completions.create(
        model="sim-small",
        messages=[
            {"role": "user", "content": "My secret is 42."},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "Forget it.", "name": "carol"},
        ],
    )
    query_id = _query_id(completion.id)
    assert (row(db, query_id)["history"] is not None, row(db, query_id)["prompt_name"]) == (True, "carol")
    assert client.delete(f"/api/v1/query/{query_id}", headers=user["headers"]).status_code == 204
    erased = row(db, query_id)
    assert (erased["prompt"], erased["history"], erased["prompt_name"], erased["response"]) == ("", None, None, None)
