"""Files expire as OpenAI's do: `expires_after` on upload, `expires_at` on the file, gone at once when past it,
deleted by the workers' sweep; a batch's output and error files expire after BATCH_OUTPUT_EXPIRES_SECONDS."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from shared.config import Settings
from shared.db import make_raw_pool
from shared.services import files as files_service
from tests.support.db import insert_user

DAY = 24 * 3600


def _line(custom_id: str, prompt: str) -> dict[str, Any]:
    body = {"model": "sim-small", "messages": [{"role": "user", "content": prompt}], "max_tokens": 50}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _expire(db: Engine, file_id: str) -> None:
    with db.begin() as conn:
        conn.execute(
            text("UPDATE files SET expires_at = now() - interval '1 second' WHERE id = :id"),
            {"id": str(uuid.UUID(hex=file_id.removeprefix("file-")))},
        )


def test_an_upload_expires_after_what_it_asked_for_and_is_gone_at_once_when_it_has(
    sdk: openai.OpenAI, db: Engine
) -> None:
    content = _jsonl([_line("a", "x")])
    # Without `expires_after`: OpenAI's 30 days for a batch file (BATCH_INPUT_EXPIRES_SECONDS).
    kept = sdk.files.create(file=("kept.jsonl", content), purpose="batch")
    assert kept.expires_at == kept.created_at + 30 * DAY
    hour = sdk.files.create(
        file=("hour.jsonl", content), purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert hour.expires_at == hour.created_at + 3600
    assert sdk.files.retrieve(hour.id).expires_at == hour.expires_at
    assert {f.id: f.expires_at for f in sdk.files.list()}[hour.id] == hour.expires_at
    month = sdk.files.create(
        file=("month.jsonl", content), purpose="batch", expires_after={"anchor": "created_at", "seconds": 30 * DAY}
    )
    assert month.expires_at == month.created_at + 30 * DAY

    _expire(db, hour.id)
    # Past its expiry it is a missing file for every read, before any sweep deleted it.
    for read in (sdk.files.retrieve, sdk.files.content, sdk.files.delete):
        with pytest.raises(openai.NotFoundError):
            read(hour.id)
    with pytest.raises(openai.NotFoundError):
        sdk.batches.create(input_file_id=hour.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert [f.id for f in sdk.files.list()] == [month.id, kept.id]
    # The list's cursor may name a file that expired since: it still marks the place.
    assert [f.id for f in sdk.files.list(after=hour.id)] == [kept.id]


def test_a_bad_expires_after_is_a_400_and_stores_nothing(sdk: openai.OpenAI, client: httpx.Client) -> None:
    content = _jsonl([_line("a", "x")])
    bad: list[tuple[Any, str]] = [
        ({"anchor": "created_at", "seconds": 3599}, "expires_after.seconds"),
        ({"anchor": "created_at", "seconds": 30 * DAY + 1}, "expires_after.seconds"),
        ({"anchor": "last_active_at", "seconds": 3600}, "expires_after.anchor"),
        ({"anchor": "created_at"}, "expires_after.seconds"),
        ({"seconds": 3600}, "expires_after.anchor"),
    ]
    for expires_after, param in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.files.create(file=("bad.jsonl", content), purpose="batch", expires_after=expires_after)
        error = caught.value.body
        assert isinstance(error, dict)
        assert (error["param"], error["code"], error["type"]) == (param, "invalid_value", "invalid_request_error")
    # Not a number, sent as a raw form (the SDK's types would not let it).
    r = client.post(
        "/v1/files",
        data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "an hour"},
        files={"file": ("bad.jsonl", content)},
        headers={"Authorization": f"Bearer {sdk.api_key}"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "expires_after.seconds"
    assert list(sdk.files.list()) == []
    # A batch's `output_expires_after` has the same bounds.
    uploaded = sdk.files.create(file=("good.jsonl", content), purpose="batch")
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 60},
        )
    assert caught.value.body["param"] == "output_expires_after.seconds"  # type: ignore[index]
    assert list(sdk.batches.list()) == []


@pytest.mark.parametrize("asked", [None, 7200])
def test_a_batchs_output_and_error_files_expire_as_it_asked_or_after_the_default(
    sdk: openai.OpenAI, asked: int | None
) -> None:
    uploaded = sdk.files.create(
        file=("mixed.jsonl", _jsonl([_line("ok", "hello"), _line("refused", "no [[sim fail=400]]")])),
        purpose="batch",
    )
    batch = sdk.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        **({"output_expires_after": {"anchor": "created_at", "seconds": asked}} if asked else {}),  # type: ignore[arg-type]
    )
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.3)
        batch = sdk.batches.retrieve(batch.id)
    assert batch.status == "completed"
    assert batch.output_file_id is not None
    assert batch.error_file_id is not None
    expected = asked or Settings.model_fields["batch_output_expires_seconds"].default
    for file_id in (batch.output_file_id, batch.error_file_id):
        written = sdk.files.retrieve(file_id)
        assert written.expires_at == written.created_at + expected
    # The input file was uploaded without `expires_after`: the input default, whatever the batch asked for.
    kept = sdk.files.retrieve(uploaded.id)
    assert kept.expires_at == kept.created_at + Settings.model_fields["batch_input_expires_seconds"].default


@pytest.mark.anyio
async def test_the_sweep_deletes_expired_files_in_batches_but_not_one_a_live_batch_reads(
    repo_database_url: str, repo_db: Engine
) -> None:
    user_id = insert_user(repo_db)
    with repo_db.begin() as conn:
        ids = [
            conn.execute(
                text(
                    "INSERT INTO files (id, user_id, purpose, filename, bytes, line_count, expires_at) "
                    "VALUES (gen_random_uuid(), :u, 'batch', 'f.jsonl', 2, 1, now() + CAST(:e AS interval)) "
                    "RETURNING id"
                ),
                {"u": user_id, "e": expiry},
            ).scalar_one()
            for expiry in ("-1 hour", "-2 hours", "-3 hours", "-4 hours", "1 hour")
        ]
        for file_id in ids:
            conn.execute(text("INSERT INTO file_chunks (file_id, seq, data) VALUES (:f, 0, 'x\n')"), {"f": file_id})
        read_by_live, *expired, unexpired = ids
        conn.execute(
            text(
                "INSERT INTO batches (id, user_id, input_file_id, endpoint, completion_window, status, expires_at) "
                "VALUES (gen_random_uuid(), :u, :f, '/v1/chat/completions', '24h', 'in_progress', now() + '1 day')"
            ),
            {"u": user_id, "f": read_by_live},
        )
    pool = await make_raw_pool(Settings(database_url=repo_database_url), "aiq-tests")
    try:
        assert await files_service.delete_expired(pool, 2) == 2
        assert await files_service.delete_expired(pool, 2) == 1
        assert await files_service.delete_expired(pool, 2) == 0
        with repo_db.begin() as conn:
            left = set(conn.execute(text("SELECT id FROM files WHERE user_id = :u"), {"u": user_id}).scalars())
            chunks = set(conn.execute(text("SELECT file_id FROM file_chunks")).scalars())
            assert left == {read_by_live, unexpired}
            assert not chunks & set(expired)
            # The batch ends: its expired input file goes with the next sweep.
            conn.execute(text("UPDATE batches SET status = 'completed' WHERE input_file_id = :f"), {"f": read_by_live})
        assert await files_service.delete_expired(pool, 2) == 1
    finally:
        await pool.close()
