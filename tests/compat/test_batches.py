"""Files and Batches through the official `openai` SDK: lines become queries; bad lines go to the error file."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.compat.conftest import make_api_key
from tests.support.api import register_and_login
from tests.support.limits import tight_apis
from tests.support.stack import Stack

ENDED = ("completed", "failed", "expired", "cancelled")


def _chat_line(custom_id: str, prompt: str, model: str = "sim-small") -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 100}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _jsonl(lines: list[Any]) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def _until_ended(sdk: openai.OpenAI, batch_id: str, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = sdk.batches.retrieve(batch_id)
        if batch.status in ENDED or time.monotonic() > deadline:
            return batch
        time.sleep(0.5)


def _bearer(sdk: openai.OpenAI) -> dict[str, str]:
    return {"Authorization": f"Bearer {sdk.api_key}"}


def _read_jsonl(sdk: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    assert file_id is not None
    lines = [json.loads(line) for line in sdk.files.content(file_id).read().splitlines()]
    return {line["custom_id"]: line for line in lines}


def test_a_batch_of_hundreds_of_lines_with_bad_ones_ends_with_output_and_error_files(sdk: openai.OpenAI) -> None:
    good = [_chat_line(f"ok-{i}", f"question {i}") for i in range(300)]
    bad: list[Any] = [
        b"{not json",
        {**_chat_line("wrong-url", "x"), "url": "/v1/embeddings"},
        _chat_line("bad-model", "x", model="gpt-unknown"),
        {"method": "POST", "url": "/v1/chat/completions", "body": {}},
        _chat_line("upstream-refused", "refuse [[sim fail=400]]"),
        {**_chat_line("bad-body", "x"), "body": {"model": "sim-small", "messages": [], "tools": []}},
    ]
    lines = good[:150] + bad + [b"   "] + good[150:]
    content = _jsonl(lines)
    uploaded = sdk.files.create(file=("requests.jsonl", content), purpose="batch")
    assert uploaded.id.startswith("file-")
    assert uploaded.bytes == len(content)
    assert sdk.files.retrieve(uploaded.id).filename == "requests.jsonl"
    assert sdk.files.content(uploaded.id).read() == content

    batch = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "t1"}
    )
    assert batch.status == "validating"
    assert batch.request_counts is not None
    assert batch.request_counts.total == 306
    done = _until_ended(sdk, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (300, 6)
    assert done.metadata == {"run": "t1"}
    assert done.completed_at is not None
    assert done.in_progress_at is not None
    assert done.finalizing_at is not None

    output = _read_jsonl(sdk, done.output_file_id)
    assert set(output) == {f"ok-{i}" for i in range(300)}
    first = output["ok-7"]["response"]
    assert first["status_code"] == 200
    assert first["body"]["object"] == "chat.completion"
    assert first["body"]["choices"][0]["message"]["content"]
    errors = sdk.files.content(done.error_file_id or "").read().splitlines()
    assert len(errors) == 6
    by_id = {e.get("custom_id"): e for e in map(json.loads, errors)}
    assert by_id["wrong-url"]["error"]["code"] == "mismatched_url"
    assert by_id["bad-model"]["error"]["code"] == "model_not_allowed"
    assert by_id["bad-body"]["error"]["code"] == "invalid_body"
    assert by_id["upstream-refused"]["response"]["status_code"] == 400
    assert by_id[None]["error"]["code"] in ("invalid_json", "invalid_custom_id")


@pytest.mark.anyio
async def test_a_responses_batch_through_the_async_client(async_sdk: openai.AsyncOpenAI) -> None:
    lines = [
        {
            "custom_id": f"r-{i}",
            "method": "POST",
            "url": "/v1/responses",
            "body": {"model": "sim-large", "input": f"hi {i}"},
        }
        for i in range(5)
    ]
    uploaded = await async_sdk.files.create(file=("r.jsonl", _jsonl(lines)), purpose="batch")
    batch = await async_sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h")
    deadline = time.monotonic() + 120
    while batch.status not in ENDED and time.monotonic() < deadline:
        batch = await async_sdk.batches.retrieve(batch.id)
    assert batch.status == "completed"
    assert batch.error_file_id is None
    assert batch.output_file_id is not None
    # The empty error file is not stored either: the user's files are the input and the output.
    assert {f.id async for f in async_sdk.files.list()} == {uploaded.id, batch.output_file_id}
    content = await (await async_sdk.files.content(batch.output_file_id)).aread()
    out = [json.loads(line) for line in content.splitlines()]
    assert sorted(o["custom_id"] for o in out) == [f"r-{i}" for i in range(5)]
    assert all(o["response"]["body"]["object"] == "response" for o in out)
    assert all(o["response"]["body"]["status"] == "completed" for o in out)


def test_cancel_ends_a_batch_cancelled_and_is_idempotent(sdk: openai.OpenAI) -> None:
    lines = [_chat_line(f"slow-{i}", f"slow {i} [[sim latency_ms=30000]]") for i in range(20)]
    uploaded = sdk.files.create(file=("slow.jsonl", _jsonl(lines)), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while sdk.batches.retrieve(batch.id).status == "validating" and time.monotonic() < deadline:
        time.sleep(0.2)
    cancelling = sdk.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    assert sdk.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = _until_ended(sdk, batch.id, timeout=90)
    assert done.status == "cancelled"
    assert done.cancelled_at is not None
    assert sdk.batches.cancel(batch.id).status == "cancelled"
    errors = _read_jsonl(sdk, done.error_file_id)
    assert len(errors) == 20
    assert done.output_file_id is None


def test_batches_list_pages_with_after(sdk: openai.OpenAI) -> None:
    uploaded = sdk.files.create(file=("one.jsonl", _jsonl([_chat_line("a", "x")])), purpose="batch")
    ids = [
        sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(3)
    ]
    first = sdk.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2]
    assert first.has_more
    rest = sdk.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in rest.data] == [ids[0]]
    assert not rest.has_more
    # Iterating a page fetches the next ones through `after`, as the SDK does.
    assert [b.id for b in sdk.batches.list(limit=2)] == ids[::-1]


def test_files_are_private_and_checked(sdk: openai.OpenAI, stack: Stack, client: httpx.Client, tmp_path: Path) -> None:
    uploaded = sdk.files.create(file=("mine.jsonl", _jsonl([_chat_line("a", "x")])), purpose="batch")
    other_key = make_api_key(client, register_and_login(client))
    other = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=other_key, max_retries=0)
    with other:
        with pytest.raises(openai.NotFoundError):
            other.files.retrieve(uploaded.id)
        with pytest.raises(openai.NotFoundError):
            other.files.content(uploaded.id)
        with pytest.raises(openai.NotFoundError):
            other.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    stranger = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="aiq_not-a-key", max_retries=0)
    with stranger, pytest.raises(openai.AuthenticationError):
        stranger.files.create(file=("x.jsonl", b'{"a": 1}\n'), purpose="batch")
    # A form without its file part (the SDK cannot send one): a 400 naming it.
    r = client.post("/v1/files", data={"purpose": "batch"}, files={"other": ("x", b"y")}, headers=_bearer(sdk))
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "file"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.files.create(file=("x.jsonl", b'{"a": 1}\n'), purpose="assistants")
    assert caught.value.body["param"] == "purpose"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        sdk.files.create(file=("empty.jsonl", b"\n  \n"), purpose="batch")
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")  # type: ignore[arg-type]
    assert caught.value.body["param"] == "endpoint"  # type: ignore[index]
    key = other_key
    with tight_apis(stack, tmp_path, 1, MAX_BATCH_LINES="3", MAX_FILE_BYTES="2048") as (url,):
        tight = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        with tight:
            with pytest.raises(openai.BadRequestError) as caught:
                tight.files.create(file=("four.jsonl", _jsonl([{"n": i} for i in range(4)])), purpose="batch")
            assert caught.value.body["code"] == "too_many_lines"  # type: ignore[index]
            with pytest.raises(openai.APIStatusError) as too_big:
                tight.files.create(file=("big.jsonl", b"x" * 200_000), purpose="batch")
            assert too_big.value.status_code == 413


def test_a_batch_holds_to_the_users_pending_cap_and_still_finishes(
    sdk: openai.OpenAI, user: dict[str, Any], db: Engine
) -> None:
    with db.begin() as conn:
        conn.execute(text("INSERT INTO user_limits (user_id, max_pending) VALUES (:u, 3)"), {"u": user["user_id"]})
    lines = [_chat_line(f"capped-{i}", f"capped {i} [[sim latency_ms=400]]") for i in range(12)]
    uploaded = sdk.files.create(file=("capped.jsonl", _jsonl(lines)), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    most_live, deadline = 0, time.monotonic() + 180
    while batch.status not in ENDED and time.monotonic() < deadline:
        with db.connect() as conn:
            live = conn.execute(
                text("SELECT count(*) FROM queries WHERE user_id = :u AND status IN ('pending', 'running')"),
                {"u": user["user_id"]},
            ).scalar_one()
        most_live = max(most_live, int(live))
        time.sleep(0.05)
        batch = sdk.batches.retrieve(batch.id)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert batch.request_counts.completed == 12
    # The cap held (a refused line waited for its turn instead of failing) and the batch used it.
    assert 0 < most_live <= 3
    assert batch.error_file_id is None
    # Every line ran as batch work: on the upstream budget interactive work leaves.
    with db.connect() as conn:
        priorities = conn.execute(
            text("SELECT DISTINCT priority FROM queries WHERE user_id = :u"), {"u": user["user_id"]}
        ).scalars()
        assert set(priorities) == {"batch"}


def test_a_batch_past_its_window_ends_expired_with_the_unfinished_lines_in_the_error_file(
    sdk: openai.OpenAI, db: Engine
) -> None:
    lines = [_chat_line(f"late-{i}", f"late {i} [[sim latency_ms=30000]]") for i in range(5)]
    uploaded = sdk.files.create(file=("late.jsonl", _jsonl(lines)), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while sdk.batches.retrieve(batch.id).status == "validating" and time.monotonic() < deadline:
        time.sleep(0.2)
    # The 24 h window, passed: the next step notices.
    with db.begin() as conn:
        conn.execute(
            text("UPDATE batches SET expires_at = now() - interval '1 second' WHERE id = :id"),
            {"id": str(uuid.UUID(hex=batch.id.removeprefix("batch_")))},
        )
    done = _until_ended(sdk, batch.id, timeout=90)
    assert done.status == "expired"
    assert done.expired_at is not None
    assert len(_read_jsonl(sdk, done.error_file_id)) == 5


def test_a_file_of_openais_50000_lines_is_accepted_and_one_more_is_refused(sdk: openai.OpenAI) -> None:
    line = json.dumps(_chat_line("x", "y")).encode() + b"\n"
    content = line * 50_000
    uploaded = sdk.files.create(file=("big.jsonl", content), purpose="batch")
    assert uploaded.bytes == len(content)
    # Streamed back in 1 MiB chunks, byte for byte.
    assert sdk.files.content(uploaded.id).read() == content
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.files.create(file=("bigger.jsonl", content + line), purpose="batch")
    assert caught.value.body["code"] == "too_many_lines"  # type: ignore[index]


def test_files_are_listed_and_deleted_but_not_while_a_live_batch_reads_them(sdk: openai.OpenAI) -> None:
    lines = [_chat_line(f"hold-{i}", f"hold {i} [[sim latency_ms=30000]]") for i in range(3)]
    uploaded = sdk.files.create(file=("held.jsonl", _jsonl(lines)), purpose="batch")
    other = sdk.files.create(file=("other.jsonl", _jsonl(lines)), purpose="batch")
    listed = [f.id for f in sdk.files.list(purpose="batch")]
    assert listed[:2] == [other.id, uploaded.id]
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.ConflictError):
        sdk.files.delete(uploaded.id)
    sdk.batches.cancel(batch.id)
    ended = _until_ended(sdk, batch.id, timeout=90)
    assert ended.status == "cancelled"
    assert sdk.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(uploaded.id)
    assert uploaded.id not in [f.id for f in sdk.files.list()]
    # The batch still names its input file, as OpenAI's do.
    assert sdk.batches.retrieve(batch.id).input_file_id == uploaded.id
    assert ended.error_file_id is not None
    assert sdk.files.delete(ended.error_file_id).deleted


def test_a_batch_cancelled_before_its_lines_were_read_reports_each_unread_line(
    sdk: openai.OpenAI, user: dict[str, Any], db: Engine
) -> None:
    # A pending cap of 1 holds the batch at its first line: the other lines are still unread when it is cancelled.
    with db.begin() as conn:
        conn.execute(text("INSERT INTO user_limits (user_id, max_pending) VALUES (:u, 1)"), {"u": user["user_id"]})
    lines = [_chat_line(f"unread-{i}", f"unread {i} [[sim latency_ms=30000]]") for i in range(4)]
    uploaded = sdk.files.create(file=("unread.jsonl", _jsonl(lines)), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    sdk.batches.cancel(batch.id)
    ended = _until_ended(sdk, batch.id, timeout=90)
    assert ended.status == "cancelled"
    assert ended.output_file_id is None
    errors = _read_jsonl(sdk, ended.error_file_id)
    # Every line is accounted for by its custom_id, whether it had become a query or was never read.
    assert set(errors) == {f"unread-{i}" for i in range(4)}
    unread = [e for e in errors.values() if e["error"] is not None]
    assert unread, "at least the lines behind the cap were never read"
    assert {e["error"]["code"] for e in unread} == {"batch_cancelled"}
