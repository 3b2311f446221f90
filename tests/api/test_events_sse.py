"""`GET /api/v1/query/{id}/events`: Server-Sent Events read with a real SSE client (httpx-sse) from the real
stack (API, Celery worker, simulator streaming over HTTP)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import ServerSentEvent, connect_sse
from sqlalchemy.engine import Engine

from devkit.procs import free_port
from tests.support.api import TEST_PASSWORD, register_and_login, send_and_leave, wait_terminal
from tests.support.asgi import in_process_api, serve_to_a_gone_client
from tests.support.db import row
from tests.support.limits import key_prefix, limits_redis, make_admin
from tests.support.polling import wait_until
from tests.support.stack import Stack, metric_value, spawn_api, spawn_worker, stop, wake_notices
from tests.support.stack import idle_api as idle_api_process

TERMINAL = {"completed", "failed", "cancelled"}


def _submit(client: httpx.Client, headers: dict[str, str], prompt: str) -> str:
    r = client.post("/api/v1/query", json={"query": f"{prompt} {uuid.uuid4()}"}, headers=headers)
    assert r.status_code == 202, r.text
    return str(r.json()["query_id"])


def _events(
    client: httpx.Client,
    headers: dict[str, str],
    query_id: str,
    *,
    last_event_id: int | None = None,
    after: int | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Read the stream (to its end, or `limit` events then drop the connection); each event's data, checked
    against its `id:` and `event:` lines."""
    hdrs = dict(headers)
    if last_event_id is not None:
        hdrs["Last-Event-ID"] = str(last_event_id)
    params = {"after": after} if after is not None else None
    out: list[dict[str, Any]] = []
    with connect_sse(client, "GET", f"/api/v1/query/{query_id}/events", headers=hdrs, params=params) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for sse in source.iter_sse():
            out.append(_data(sse))
            if limit is not None and len(out) >= limit:
                break
    return out


def _data(sse: ServerSentEvent) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(sse.data)
    assert sse.id == str(data["seq"])
    assert sse.event == data["type"]
    return data


def _text(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "delta")


@pytest.fixture
def sse_client(stack: Stack) -> Any:
    with httpx.Client(base_url=stack.api_url, timeout=httpx.Timeout(30, read=30)) as c:
        yield c


def test_stream_tells_the_whole_story_and_the_deltas_make_the_answer(
    sse_client: httpx.Client, user: dict[str, Any]
) -> None:
    query_id = _submit(sse_client, user["headers"], "[[sim tokens=300 chunk_ms=2]] tell me")
    events = _events(sse_client, user["headers"], query_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    types = [e["type"] for e in events]
    assert types[:2] == ["queued", "started"]
    assert types[-1] == "completed"
    assert set(types[2:-1]) == {"delta"}
    # Coalesced: 300 words streamed one per chunk arrive in fewer appends.
    assert 1 <= len(types[2:-1]) < 300
    body = sse_client.get(f"/api/v1/query/{query_id}", headers=user["headers"]).json()
    assert _text(events) == body["response"]
    assert events[-1]["usage"] == body["usage"]
    assert events[-1]["cached"] is False
    assert events[1]["attempt"] == 1


def test_a_one_read_answer_tells_started_delta_completed_with_one_notice_for_its_end(
    sse_client: httpx.Client, stack: Stack, user: dict[str, Any]
) -> None:
    # A short answer arrives in one read with its end of stream: its text rides in the end's round trip, ahead of
    # `completed`, and sends no wake-up notice of its own (the end's wakes the readers for both). The other
    # events tell only a query that a stream follows (shared/events.py).
    with wake_notices(stack) as heard:
        query_id = _submit(sse_client, user["headers"], "[[sim tokens=12]] short")
        events = _events(sse_client, user["headers"], query_id)
        notices = heard(query_id)
    assert [e["type"] for e in events] == ["queued", "started", "delta", "completed"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert events[2]["text"] == sse_client.get(f"/api/v1/query/{query_id}", headers=user["headers"]).json()["response"]
    # `started` is told only if the stream marked the query before the worker appended it (it usually has).
    assert notices in (["started", "completed"], ["completed"])


def test_resume_at_every_position_gives_exactly_the_rest(sse_client: httpx.Client, user: dict[str, Any]) -> None:
    query_id = _submit(sse_client, user["headers"], "[[sim tokens=60 chunk_ms=20]] resumable")
    # Live: drop after two events (the query is still streaming), resume with Last-Event-ID.
    first = _events(sse_client, user["headers"], query_id, limit=2)
    rest = _events(sse_client, user["headers"], query_id, last_event_id=first[-1]["seq"])
    full = first + rest
    assert [e["seq"] for e in full] == list(range(1, len(full) + 1))
    assert full[-1]["type"] == "completed"
    answer = sse_client.get(f"/api/v1/query/{query_id}", headers=user["headers"]).json()["response"]
    assert _text(full) == answer
    # Every position: with the header and with ?after, exactly the events after it, no gap, no duplicate.
    for k in range(len(full) + 1):
        if k % 2:
            resumed = _events(sse_client, user["headers"], query_id, last_event_id=k)
        else:
            resumed = _events(sse_client, user["headers"], query_id, after=k)
        assert resumed == full[k:], k
        assert _text(full[:k]) + _text(resumed) == answer


def test_last_event_id_wins_over_after_and_must_be_a_number(sse_client: httpx.Client, user: dict[str, Any]) -> None:
    query_id = _submit(sse_client, user["headers"], "resume rules")
    full = _events(sse_client, user["headers"], query_id)
    resumed = _events(sse_client, user["headers"], query_id, last_event_id=2, after=1)
    assert resumed == full[2:]
    r = sse_client.get(f"/api/v1/query/{query_id}/events", headers={**user["headers"], "Last-Event-ID": "two"})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_last_event_id"
    # Latin-1 digits that are not ASCII (superscripts): str.isdigit() says yes, int() says no.
    for raw in (b"\xb2", b"1\xb9"):
        r = sse_client.get(
            f"/api/v1/query/{query_id}/events", headers=[*user["headers"].items(), (b"Last-Event-ID", raw)]
        )
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_last_event_id"
    r = sse_client.get(f"/api/v1/query/{query_id}/events", headers=user["headers"], params={"after": -1})
    assert r.status_code == 422


def test_cancel_mid_stream_ends_the_stream_with_cancelled(sse_client: httpx.Client, user: dict[str, Any]) -> None:
    query_id = _submit(sse_client, user["headers"], "[[sim tokens=400 chunk_ms=25]] long story")
    seen: list[dict[str, Any]] = []
    with connect_sse(sse_client, "GET", f"/api/v1/query/{query_id}/events", headers=user["headers"]) as source:
        for sse in source.iter_sse():
            seen.append(_data(sse))
            if seen[-1]["type"] == "delta" and len(seen) == 3:
                r = sse_client.post(f"/api/v1/query/{query_id}/cancel", headers=user["headers"])
                assert r.status_code in (200, 202), r.text
        # The server ended the stream after the terminal event.
    assert seen[-1]["type"] == "cancelled"
    assert [e["type"] for e in seen].count("cancelled") == 1
    assert row_status(sse_client, user, query_id) == "cancelled"


def test_cancelling_a_pending_query_tells_its_stream(
    sse_client: httpx.Client, user: dict[str, Any], db: Engine, stack: Stack, tmp_path: Path
) -> None:
    # An API on a queue no worker reads: the query stays pending until the cancel.
    queue = f"aiq.sse.pending.{uuid.uuid4().hex[:6]}"
    api, url = spawn_api(stack, tmp_path / "api.log", QUEUE_NAME=queue)
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=30)) as other:
            query_id = _submit(other, user["headers"], "never picked up")
            r = other.post(f"/api/v1/query/{query_id}/cancel", headers=user["headers"])
            assert r.status_code == 200
            events = _events(other, user["headers"], query_id)
    finally:
        stop(api)
    assert [e["type"] for e in events] == ["queued", "cancelled"]


def test_deleting_a_pending_query_ends_its_open_stream_at_once(
    sse_client: httpx.Client, user: dict[str, Any], db: Engine, stack: Stack, tmp_path: Path
) -> None:
    # An API on a queue no worker reads: the query stays pending until the delete.
    queue = f"aiq.sse.delete.{uuid.uuid4().hex[:6]}"
    api, url = spawn_api(stack, tmp_path / "api.log", QUEUE_NAME=queue)
    try:
        with (
            httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=30)) as other,
            httpx.Client(base_url=url, timeout=10) as deleter,
        ):
            query_id = _submit(other, user["headers"], "never picked up, then deleted")
            seen: list[dict[str, Any]] = []
            path = f"/api/v1/query/{query_id}/events"
            with connect_sse(other, "GET", path, headers=user["headers"]) as source:
                for sse in source.iter_sse():
                    seen.append(_data(sse))
                    if len(seen) == 1:
                        assert deleter.delete(f"/api/v1/query/{query_id}", headers=user["headers"]).status_code == 204
                        deleted_at = time.monotonic()
            # Told by the wake-up, not found by the stream's idle re-read (IDLE_REREAD_SECONDS, 30 s) of the row.
            assert time.monotonic() - deleted_at < 15
    finally:
        stop(api)
    assert [e["type"] for e in seen] == ["queued", "cancelled"]


def row_status(client: httpx.Client, user: dict[str, Any], query_id: str) -> str:
    return str(client.get(f"/api/v1/query/{query_id}", headers=user["headers"]).json()["status"])


def test_failures_and_retries_are_told(sse_client: httpx.Client, user: dict[str, Any]) -> None:
    retried = _submit(sse_client, user["headers"], "[[sim fail=500 times=1]] flaky")
    events = _events(sse_client, user["headers"], retried)
    types = [e["type"] for e in events]
    assert types[:3] == ["queued", "started", "retry_scheduled"]
    retry = events[2]
    assert retry["code"] == "upstream_error"
    assert retry["delay_s"] > 0
    assert "retry_after_s" in retry
    assert types[3:5] == ["attempt_restarted", "started"]
    assert events[3]["attempt"] == 2
    assert events[3]["previous_attempt"] == 1
    assert types[-1] == "completed"

    failed = _submit(sse_client, user["headers"], "[[sim fail=400]] bad")
    events = _events(sse_client, user["headers"], failed)
    assert events[-1]["type"] == "failed"
    assert events[-1]["code"] == "upstream_bad_request"
    assert events[-1]["message"]


def test_expired_log_replays_the_stored_answer(sse_client: httpx.Client, stack: Stack, user: dict[str, Any]) -> None:
    query_id = _submit(sse_client, user["headers"], "[[sim tokens=40]] remember me")
    live = _events(sse_client, user["headers"], query_id)
    # The log's TTL passes (or Redis loses it): the keys are gone.
    r = redis.Redis.from_url(stack.settings.redis_url)
    key = f"aiq:{stack.settings.queue_name}:ev:{query_id}"
    assert r.delete(key, f"{key}:seq") == 2
    r.close()
    replayed = _events(sse_client, user["headers"], query_id)
    assert [e["type"] for e in replayed] == ["delta", "completed"]
    assert replayed[0]["text"] == _text(live)
    assert replayed[0]["replayed"] is True
    assert replayed[1]["usage"] == live[-1]["usage"]
    assert [e["seq"] for e in replayed] == [1, 2]
    # A resume from where the client was continues the numbering.
    resumed = _events(sse_client, user["headers"], query_id, last_event_id=5)
    assert [e["seq"] for e in resumed] == [6, 7]


def test_a_log_lost_mid_stream_never_gives_a_gap(sse_client: httpx.Client, stack: Stack, user: dict[str, Any]) -> None:
    query_id = _submit(sse_client, user["headers"], "[[sim tokens=60 chunk_ms=100]] lost mid-stream")
    seen: list[dict[str, Any]] = []
    r = redis.Redis.from_url(stack.settings.redis_url)
    key = f"aiq:{stack.settings.queue_name}:ev:{query_id}"
    with connect_sse(sse_client, "GET", f"/api/v1/query/{query_id}/events", headers=user["headers"]) as source:
        for sse in source.iter_sse():
            seen.append(_data(sse))
            if seen[-1]["type"] == "delta" and len([e for e in seen if e["type"] == "delta"]) == 1:
                # As a Redis restart without persistence would: the worker's next appends start a new log.
                r.delete(key, f"{key}:seq")
    assert seen[-1]["type"] == "completed"
    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
    text = ""
    for e in seen:
        if e["type"] == "delta":
            text = e["text"] if e.get("replayed") else text + e["text"]
    answer = sse_client.get(f"/api/v1/query/{query_id}", headers=user["headers"]).json()["response"]
    assert text == answer
    assert any(e.get("replayed") for e in seen)


def test_another_users_query_is_a_404(sse_client: httpx.Client, user: dict[str, Any]) -> None:
    query_id = _submit(sse_client, user["headers"], "mine")
    stranger = register_and_login(sse_client)
    r = sse_client.get(f"/api/v1/query/{query_id}/events", headers=stranger["headers"])
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "query_not_found"
    r = sse_client.get(f"/api/v1/query/{uuid.uuid4()}/events", headers=user["headers"])
    assert r.status_code == 404
    r = sse_client.get(f"/api/v1/query/{query_id}/events")
    assert r.status_code == 401


def test_stream_cap_keepalives_and_slot_release(stack: Stack, tmp_path: Path) -> None:
    api, url = spawn_api(stack, tmp_path / "api.log", MAX_STREAMS_PER_USER="1", SSE_KEEPALIVE_SECONDS="0.3")
    try:
        with (
            httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=30)) as c,
            httpx.Client(base_url=url, timeout=10) as c2,
        ):
            user = register_and_login(c)
            slow = _submit(c, user["headers"], "[[sim latency_ms=3000]] slow")
            with c.stream("GET", f"/api/v1/query/{slow}/events", headers=user["headers"]) as first:
                assert first.status_code == 200
                # Idle between `started` and the first delta: keep-alive comments.
                # One iterator kept open: dropping a half-read one closes the connection.
                lines = first.iter_lines()
                seen = [next(lines)]
                while seen[-1] != ": keep-alive" and len(seen) < 30:
                    seen.append(next(lines))
                assert seen[-1] == ": keep-alive", seen
                r = c2.get(f"/api/v1/query/{slow}/events", headers=user["headers"])
                assert r.status_code == 429
                assert r.json()["error"]["code"] == "too_many_streams"
                assert int(r.headers["Retry-After"]) >= 1
            # The first stream is closed: its slot comes back.
            wait_terminal(c2, user["headers"], slow, timeout=30)

            def reopened() -> bool:
                return c2.get(f"/api/v1/query/{slow}/events", headers=user["headers"]).status_code == 200

            wait_until(reopened, timeout=10, interval=0.2)
    finally:
        stop(api)


def test_a_client_gone_before_the_body_gives_its_stream_slot_back_at_once(stack: Stack, tmp_path: Path) -> None:
    # The handler takes the slot before the client's leaving is noticed. The slot must come back at once, not when
    # its lease (30 s) lapses, or a quick reconnect hears 429s; the open-streams gauge must not count it.
    metrics_port = free_port()
    api, url = spawn_api(stack, tmp_path / "api.log", MAX_STREAMS_PER_USER="1", API_METRICS_PORT=str(metrics_port))
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    path_route = "/api/v1/query/{query_id}/events"
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=30)) as c:
            user = register_and_login(c)
            slots = f"{key_prefix(stack.settings.queue_name)}streams:{user['user_id']}"
            slow = _submit(c, user["headers"], "[[sim latency_ms=5000]] left at once")
            send_and_leave(url, "GET", f"/api/v1/query/{slow}/events", user["headers"])
            # The request has been handled to its end (counted), and nothing of it is left in the cap.
            wait_until(lambda: metric_value(metrics, "aiq_http_requests_total", route=path_route) >= 1, timeout=10)
            with limits_redis(stack) as r:
                wait_until(lambda: r.zcard(slots) == 0, timeout=2)
            assert metric_value(metrics, "aiq_sse_streams_open") == 0
            with c.stream("GET", f"/api/v1/query/{slow}/events", headers=user["headers"]) as again:
                assert again.status_code == 200
    finally:
        stop(api)


@pytest.mark.anyio
async def test_a_stream_whose_body_never_starts_still_gives_its_slot_back(stack: Stack) -> None:
    # An ASGI 2.4 server raises from `send` once the client is gone: the response start fails and the body, whose
    # `finally` would give the slot back, never runs. (uvicorn, ASGI 2.3, lets the body start and cancels it.)
    with httpx.Client(base_url=stack.api_url, timeout=30) as c:
        user = register_and_login(c)
        slow = _submit(c, user["headers"], "[[sim latency_ms=3000]] never told")
    slots = f"{key_prefix(stack.settings.queue_name)}streams:{user['user_id']}"
    async with in_process_api(stack.settings.model_copy(update={"max_streams_per_user": 1})) as app:
        await serve_to_a_gone_client(app, "GET", f"/api/v1/query/{slow}/events", user["headers"])
    with limits_redis(stack) as r:
        assert r.zcard(slots) == 0


def test_stream_cap_holds_under_parallel_opens_on_two_api_processes(stack: Stack, tmp_path: Path) -> None:
    cap, tries = 3, 12
    apis = [
        spawn_api(stack, tmp_path / f"api{i}.log", MAX_STREAMS_PER_USER=str(cap), SSE_KEEPALIVE_SECONDS="0.3")
        for i in range(2)
    ]
    try:
        with httpx.Client(base_url=apis[0][1], timeout=30) as c:
            user = register_and_login(c)
            slow = _submit(c, user["headers"], "[[sim latency_ms=8000]] held open")
        start = threading.Barrier(tries)
        release = threading.Event()
        codes: list[int] = []
        lock = threading.Lock()

        def open_one(i: int) -> None:
            with httpx.Client(base_url=apis[i % 2][1], timeout=httpx.Timeout(30, read=30)) as client:
                start.wait()
                with client.stream("GET", f"/api/v1/query/{slow}/events", headers=user["headers"]) as r:
                    with lock:
                        codes.append(r.status_code)
                    if r.status_code == 200:
                        # Hold the slot until every open has been answered.
                        release.wait(30)

        threads = [threading.Thread(target=open_one, args=(i,)) for i in range(tries)]
        for t in threads:
            t.start()
        wait_until(lambda: len(codes) == tries, timeout=30)
        release.set()
        for t in threads:
            t.join(30)
        assert sorted(codes) == [200] * cap + [429] * (tries - cap)
    finally:
        for api, _ in apis:
            stop(api)


def test_worker_sigkill_mid_stream_restarts_the_attempt_visibly(
    sse_client: httpx.Client, stack: Stack, user: dict[str, Any], db: Engine, tmp_path: Path
) -> None:
    # A second worker on the stack's queue; the query to follow is one it claimed (the row says who holds it).
    # After the kill the stack's own worker sweeps the expired lease and runs attempt 2.
    victim, _ = spawn_worker(stack, tmp_path / "victim.log")
    try:
        for _ in range(30):
            query_id = _submit(sse_client, user["headers"], "[[sim tokens=150 chunk_ms=30]] interrupted")
            owner = wait_until(lambda: row(db, query_id)["lease_owner"], timeout=20)  # noqa: B023
            if owner.endswith(f":{victim.pid}"):
                break
        else:
            pytest.fail("the extra worker never claimed a query")
        seen: list[dict[str, Any]] = []
        with connect_sse(sse_client, "GET", f"/api/v1/query/{query_id}/events", headers=user["headers"]) as source:
            for sse in source.iter_sse():
                seen.append(_data(sse))
                if victim.poll() is None and sum(e["type"] == "delta" for e in seen) == 3:
                    os.kill(victim.pid, signal.SIGKILL)
                    victim.wait(10)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(10)
    body = sse_client.get(f"/api/v1/query/{query_id}", headers=user["headers"]).json()
    types = [e["type"] for e in seen]
    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
    assert types[-1] == "completed"
    restart = types.index("attempt_restarted")
    assert seen[restart]["attempt"] == 2
    assert seen[restart]["previous_attempt"] == 1
    # Before the restart only attempt 1's text, after it only attempt 2's, and that is the answer.
    assert sum(e["type"] == "delta" for e in seen[:restart]) >= 3
    assert all(e["attempt"] == 1 for e in seen[:restart] if e["type"] == "delta")
    assert all(e["attempt"] == 2 for e in seen[restart:] if e["type"] in ("delta", "started", "completed"))
    assert _text(seen[restart:]) == body["response"]
    assert body["attempts"] == 2


def test_a_provider_call_without_streaming_arrives_as_one_delta(stack: Stack, tmp_path: Path) -> None:
    # LLM_STREAM=false: the worker makes the plain call (for a provider that cannot stream).
    queue = f"aiq.sse.nostream.{uuid.uuid4().hex[:6]}"
    api, url = spawn_api(stack, tmp_path / "api.log", QUEUE_NAME=queue)
    worker, _ = spawn_worker(stack, tmp_path / "worker.log", QUEUE_NAME=queue, LLM_STREAM="false")
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=30)) as c:
            user = register_and_login(c)
            query_id = _submit(c, user["headers"], "[[sim tokens=50]] whole")
            events = _events(c, user["headers"], query_id)
            body = c.get(f"/api/v1/query/{query_id}", headers=user["headers"]).json()
    finally:
        stop(worker)
        stop(api)
    assert [e["type"] for e in events] == ["queued", "started", "delta", "completed"]
    assert events[2]["text"] == body["response"]
    assert events[3]["usage"] == body["usage"]


def test_an_admin_requeue_starts_the_story_again(sse_client: httpx.Client, user: dict[str, Any], db: Engine) -> None:
    # Fails with 500 on every attempt of the stack (MAX_ATTEMPTS=3), then the simulator answers.
    query_id = _submit(sse_client, user["headers"], "[[sim fail=500 times=3]] requeued")
    first = _events(sse_client, user["headers"], query_id)
    assert first[-1]["type"] == "failed"
    make_admin(db, user["user_id"])
    r = sse_client.post(f"/api/v1/admin/queries/{query_id}/requeue", headers=user["headers"])
    assert r.status_code == 200, r.text
    # From the start: the earlier story is trimmed, so a follower does not stop at the old end.
    again = _events(sse_client, user["headers"], query_id)
    assert again[0]["type"] == "queued"
    assert again[0]["requeued"] is True
    assert again[0]["seq"] == first[-1]["seq"] + 1
    assert again[-1]["type"] == "completed"
    assert _text(again) == row(db, query_id)["response"]
    # A client that saw the old end resumes right after it.
    assert _events(sse_client, user["headers"], query_id, last_event_id=first[-1]["seq"]) == again


def test_a_cache_hit_streams_its_stored_answer_at_once(sse_client: httpx.Client, user: dict[str, Any]) -> None:
    # Answered at submit from the response cache: no worker, no log; the stream tells the row.
    body = {"query": f"cache me {uuid.uuid4()}", "cache": True}
    first = sse_client.post("/api/v1/query", json=body, headers=user["headers"]).json()["query_id"]
    answer = _events(sse_client, user["headers"], first)
    hit = sse_client.post("/api/v1/query", json=body, headers=user["headers"]).json()
    assert hit["cached"] is True
    events = _events(sse_client, user["headers"], hit["query_id"])
    assert [e["type"] for e in events] == ["delta", "completed"]
    assert events[0]["text"] == _text(answer)
    assert events[1]["cached"] is True
    assert events[1]["usage"] == answer[-1]["usage"]


@pytest.fixture
def idle_api(stack: Stack, tmp_path: Path) -> Iterator[str]:
    with idle_api_process(stack, tmp_path / "api.log") as url:
        yield url


def _stream_ended_by(client: httpx.Client, path: str, headers: dict[str, str], act: Callable[[], None]) -> list[str]:
    """Open the stream, `act` at its first event, read on to the stream's end: the event types seen. The end must come
    from the credential re-check (once per keep-alive interval), not from an event or the read timeout."""
    seen: list[str] = []
    acted_at = float("inf")
    with connect_sse(client, "GET", path, headers=headers) as source:
        assert source.response.status_code == 200, source.response.read()
        for sse in source.iter_sse():
            seen.append(_data(sse)["type"])
            if len(seen) == 1:
                act()
                acted_at = time.monotonic()
    assert time.monotonic() - acted_at < 10
    return seen


def test_logging_out_ends_the_streams_its_access_token_opened(idle_api: str) -> None:
    with (
        httpx.Client(base_url=idle_api, timeout=httpx.Timeout(30, read=30)) as c,
        httpx.Client(base_url=idle_api, timeout=10) as other,
    ):
        user = register_and_login(c)
        path = f"/api/v1/query/{_submit(c, user['headers'], 'never picked up; its owner logs out')}/events"

        def log_out() -> None:
            r = other.post("/api/v1/auth/logout", headers=user["headers"])
            assert r.status_code == 204, r.text

        assert _stream_ended_by(c, path, user["headers"], log_out) == ["queued"]
        again = c.get(path, headers=user["headers"])
        assert again.status_code == 401
        assert again.json()["error"]["code"] == "token_revoked"


def test_logging_out_everywhere_from_another_session_ends_open_streams(idle_api: str) -> None:
    with (
        httpx.Client(base_url=idle_api, timeout=httpx.Timeout(30, read=30)) as c,
        httpx.Client(base_url=idle_api, timeout=10) as other,
    ):
        user = register_and_login(c)
        path = f"/api/v1/query/{_submit(c, user['headers'], 'never picked up; its owner logs out everywhere')}/events"
        r = other.post("/api/v1/auth/login", json={"email": user["email"], "password": TEST_PASSWORD})
        assert r.status_code == 200, r.text
        elsewhere = {"Authorization": f"Bearer {r.json()['access_token']}"}

        def log_out_everywhere() -> None:
            r = other.post("/api/v1/auth/logout-all", headers=elsewhere)
            assert r.status_code == 204, r.text

        assert _stream_ended_by(c, path, user["headers"], log_out_everywhere) == ["queued"]
        again = c.get(path, headers=user["headers"])
        assert again.status_code == 401
        assert again.json()["error"]["code"] == "token_revoked"


def test_revoking_an_api_key_ends_the_streams_it_opened_and_only_those(idle_api: str) -> None:
    with (
        httpx.Client(base_url=idle_api, timeout=httpx.Timeout(30, read=30)) as c,
        httpx.Client(base_url=idle_api, timeout=10) as other,
    ):
        user = register_and_login(c)
        created = c.post("/api/v1/keys", json={"name": "streamer"}, headers=user["headers"])
        assert created.status_code == 201, created.text
        key_headers = {"Authorization": f"Bearer {created.json()['key']}"}
        path = f"/api/v1/query/{_submit(c, key_headers, 'never picked up; its key is revoked')}/events"

        def revoke() -> None:
            r = other.delete(f"/api/v1/keys/{created.json()['id']}", headers=user["headers"])
            assert r.status_code == 204, r.text

        assert _stream_ended_by(c, path, key_headers, revoke) == ["queued"]
        again = c.get(path, headers=key_headers)
        assert again.status_code == 401
        assert again.json()["error"]["code"] == "invalid_api_key"
        # The user's access token is not the key: its stream of the same query stays open past several re-checks.
        with connect_sse(c, "GET", path, headers=user["headers"]) as source:
            lines = source.response.iter_lines()
            seen = [next(lines) for _ in range(12)]
        assert seen.count(": keep-alive") >= 4, seen


def test_disabling_an_account_ends_its_open_streams(idle_api: str, db: Engine) -> None:
    with (
        httpx.Client(base_url=idle_api, timeout=httpx.Timeout(30, read=30)) as c,
        httpx.Client(base_url=idle_api, timeout=10) as admin_client,
    ):
        user = register_and_login(c)
        admin = register_and_login(admin_client)
        make_admin(db, admin["user_id"])
        path = f"/api/v1/query/{_submit(c, user['headers'], 'never picked up; its owner is disabled meanwhile')}/events"

        def disable() -> None:
            r = admin_client.post(f"/api/v1/admin/users/{user['user_id']}/disable", headers=admin["headers"])
            assert r.status_code == 200, r.text

        assert _stream_ended_by(c, path, user["headers"], disable) == ["queued"]
        again = c.get(path, headers=user["headers"])
        assert again.status_code == 401
        assert again.json()["error"]["code"] == "account_disabled"
