"""Webhooks end to end: API → worker → a receiver in the test, signatures checked by the reference library."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from standardwebhooks.webhooks import Webhook

from tests.support.api import register_and_login, wait_terminal
from tests.support.db import count_rows, insert_query
from tests.support.limits import limits_redis
from tests.support.polling import wait_until
from tests.support.stack import Stack


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A local webhook receiver: records every POST and answers from a script (then 204)."""

    url: str
    received: list[Received] = field(default_factory=list)
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait(self, count: int, timeout: float = 30) -> list[Received]:
        wait_until(lambda: len(self.received) >= count, timeout=timeout)
        return self.received


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            with state.lock:
                state.received.append(
                    Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic())
                )
                status, headers = state.script.pop(0) if state.script else (204, {})
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _secret(client: httpx.Client, user: dict[str, Any]) -> str:
    r = client.get("/api/v1/webhooks/secret", headers=user["headers"])
    assert r.status_code == 200, r.text
    secret: str = r.json()["secret"]
    return secret


def _submit(client: httpx.Client, user: dict[str, Any], prompt: str, **extra: Any) -> str:
    r = client.post("/api/v1/query", json={"query": prompt, **extra}, headers=user["headers"])
    assert r.status_code == 202, r.text
    query_id: str = r.json()["query_id"]
    return query_id


def _deliveries(client: httpx.Client, user: dict[str, Any], query_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/api/v1/query/{query_id}/deliveries", headers=user["headers"])
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()
    return items


def test_per_query_webhook_is_signed_thin_and_logged(
    client: httpx.Client, stack: Stack, user: dict[str, Any], receiver: Receiver
) -> None:
    secret = _secret(client, user)
    prompt = f"a private prompt {uuid.uuid4()}"
    query_id = _submit(client, user, prompt, webhook_url=f"{receiver.url}/hook?t=1")
    body = wait_terminal(client, user["headers"], query_id)
    got = receiver.wait(1)[0]
    assert got.path == "/hook?t=1"
    payload = Webhook(secret).verify(got.body, got.headers)
    assert payload["type"] == "query.completed"
    assert payload["data"]["query_id"] == query_id
    assert payload["data"]["status"] == "completed"
    assert payload["data"]["usage"] == body["usage"]
    assert payload["data"]["error"] is None
    assert payload["timestamp"].endswith("Z")
    # Thin: neither the prompt nor the answer travels.
    assert prompt.encode() not in got.body
    assert body["response"].encode() not in got.body
    assert got.headers["content-type"] == "application/json"

    [delivery] = wait_until(lambda: [d for d in _deliveries(client, user, query_id) if d["status"] == "delivered"])
    assert delivery["id"] == got.headers["webhook-id"]
    assert delivery["attempts"] == 1
    assert delivery["last_status_code"] == 204
    assert delivery["event_type"] == "query.completed"


def test_account_endpoint_retries_with_the_same_id_and_honours_retry_after(
    client: httpx.Client, stack: Stack, user: dict[str, Any], receiver: Receiver
) -> None:
    r = client.put("/api/v1/webhooks/endpoint", json={"url": f"{receiver.url}/acct"}, headers=user["headers"])
    assert r.status_code == 200, r.text
    assert r.json()["enabled"] is True
    secret = _secret(client, user)
    receiver.script = [(500, {}), (429, {"Retry-After": "3"})]
    query_id = _submit(client, user, f"[[sim fail=400]] fails {uuid.uuid4()}")
    attempts = receiver.wait(3, timeout=60)
    assert len({a.headers["webhook-id"] for a in attempts}) == 1
    assert {a.body for a in attempts} == {attempts[0].body}
    payload = Webhook(secret).verify(attempts[2].body, attempts[2].headers)
    assert payload["type"] == "query.failed"
    assert payload["data"]["error"]["code"]
    # The third attempt waited for the receiver's Retry-After (3 s), not the 1 s schedule.
    assert attempts[2].at - attempts[1].at >= 2.9
    [delivery] = wait_until(lambda: [d for d in _deliveries(client, user, query_id) if d["status"] == "delivered"])
    assert delivery["attempts"] == 3


def test_gone_disables_the_endpoint_and_put_enables_it_again(
    client: httpx.Client, stack: Stack, user: dict[str, Any], receiver: Receiver
) -> None:
    url = f"{receiver.url}/gone"
    assert client.put("/api/v1/webhooks/endpoint", json={"url": url}, headers=user["headers"]).status_code == 200
    receiver.script = [(410, {})]
    query_id = _submit(client, user, "answer me")
    receiver.wait(1)
    wait_until(lambda: _deliveries(client, user, query_id)[0]["status"] == "failed")
    endpoint = client.get("/api/v1/webhooks/endpoint", headers=user["headers"]).json()
    assert endpoint["enabled"] is False
    assert endpoint["disabled_reason"] == "gone"
    # Disabled: the next query sends nothing.
    wait_terminal(client, user["headers"], _submit(client, user, "nobody listens"))
    time.sleep(1.5)
    assert len(receiver.received) == 1
    assert client.put("/api/v1/webhooks/endpoint", json={"url": url}, headers=user["headers"]).json()["enabled"]


def test_rotation_signs_with_old_and_new_secret(
    client: httpx.Client, stack: Stack, user: dict[str, Any], receiver: Receiver
) -> None:
    old = _secret(client, user)
    r = client.post("/api/v1/webhooks/secret/rotate", headers=user["headers"])
    assert r.status_code == 200, r.text
    new = r.json()["secret"]
    assert new != old
    assert r.json()["previous_secret_expires_at"] is not None
    assert _secret(client, user) == new
    _submit(client, user, "rotated", webhook_url=f"{receiver.url}/r")
    got = receiver.wait(1)[0]
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(got.body, got.headers)
    Webhook(new).verify(got.body, got.headers)


def test_cancel_of_a_pending_query_sends_query_cancelled(
    client: httpx.Client, stack: Stack, user: dict[str, Any], receiver: Receiver, db: Engine
) -> None:
    secret = _secret(client, user)
    # Parked for an hour: the worker cannot claim it before the cancel.
    query_id = insert_query(
        db, user["user_id"], next_attempt_at="now() + interval '1 hour'", webhook_url=f"'{receiver.url}/c'"
    )
    r = client.post(f"/api/v1/query/{query_id}/cancel", headers=user["headers"])
    assert r.status_code == 200, r.text
    payload = Webhook(secret).verify(receiver.wait(1)[0].body, receiver.received[0].headers)
    assert payload["type"] == "query.cancelled"
    assert payload["data"]["error"] == {"code": "cancelled"}


def test_a_response_cache_hit_sends_its_webhook_too(
    client: httpx.Client, stack: Stack, user: dict[str, Any], receiver: Receiver
) -> None:
    # A hit is stored completed by its INSERT: no status UPDATE, yet a service that gave a webhook_url so as
    # not to poll must still hear that its query ended.
    secret = _secret(client, user)
    prompt = f"cached and hooked {uuid.uuid4()}"
    first = _submit(client, user, prompt, cache=True, webhook_url=f"{receiver.url}/first")
    wait_terminal(client, user["headers"], first)
    receiver.wait(1)
    wait_until(lambda: not limits_redis(stack).exists(f"aiq:{stack.settings.queue_name}:cache:intent:{first}"))
    hit_id = _submit(client, user, prompt, cache=True, webhook_url=f"{receiver.url}/hit")
    hit = client.get(f"/api/v1/query/{hit_id}", headers=user["headers"]).json()
    assert hit["cached"] is True
    got = wait_until(lambda: [x for x in receiver.received if x.path == "/hit"], timeout=30)[0]
    payload = Webhook(secret).verify(got.body, got.headers)
    assert payload["type"] == "query.completed"
    assert payload["data"]["query_id"] == hit["query_id"]
    assert payload["data"]["attempts"] == 0


def test_an_end_written_without_any_message_is_still_delivered_by_the_sweep(
    client: httpx.Client, stack: Stack, user: dict[str, Any], receiver: Receiver, db: Engine
) -> None:
    # As if the process died right after the terminal write: the trigger wrote the outbox row, nobody sent it.
    query_id = insert_query(
        db, user["user_id"], status="'running'", attempts="1", webhook_url=f"'{receiver.url}/crash'"
    )
    with db.begin() as conn:
        conn.execute(
            text("UPDATE queries SET status = 'failed', error_code = 'worker_lost', finished_at = now() WHERE id = :q"),
            {"q": query_id},
        )
    assert count_rows(db, "SELECT count(*) FROM webhook_deliveries WHERE query_id = :q", q=query_id) == 1
    got = receiver.wait(1, timeout=30)[0]
    payload = Webhook(_secret(client, user)).verify(got.body, got.headers)
    assert payload["data"] == {
        "query_id": query_id,
        "status": "failed",
        "model": "sim-small",
        "attempts": 1,
        "usage": None,
        "error": {"code": "worker_lost"},
    }


def test_redeliver_sends_the_same_message_again_and_is_owner_only(
    client: httpx.Client, stack: Stack, user: dict[str, Any], receiver: Receiver
) -> None:
    query_id = _submit(client, user, "again", webhook_url=f"{receiver.url}/again")
    first = receiver.wait(1)[0]
    delivery_id = first.headers["webhook-id"]
    wait_until(lambda: _deliveries(client, user, query_id)[0]["status"] == "delivered")
    other = register_and_login(client)
    path = f"/api/v1/query/{query_id}/deliveries"
    assert client.get(path, headers=other["headers"]).status_code == 404
    assert client.post(f"{path}/{delivery_id}/redeliver", headers=other["headers"]).status_code == 404
    assert client.post(f"{path}/{uuid.uuid4()}/redeliver", headers=user["headers"]).status_code == 404
    r = client.post(f"{path}/{delivery_id}/redeliver", headers=user["headers"])
    assert r.status_code == 202, r.text
    second = receiver.wait(2)[1]
    assert second.headers["webhook-id"] == delivery_id
    assert second.body == first.body
    wait_until(lambda: _deliveries(client, user, query_id)[0]["attempts"] == 2)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "http://10.0.0.1/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/x",
        "http://localhost/x",
        "http://user:pw@example.com/x",
        "https://example.com/" + "a" * 2100,
    ],
)
def test_bad_webhook_urls_are_422_and_store_nothing(
    client: httpx.Client, stack: Stack, user: dict[str, Any], db: Engine, url: str
) -> None:
    before = count_rows(db, "SELECT count(*) FROM queries WHERE user_id = :u", u=user["user_id"])
    r = client.post("/api/v1/query", json={"query": "hi", "webhook_url": url}, headers=user["headers"])
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"][0]["loc"] == ["body", "webhook_url"]
    assert count_rows(db, "SELECT count(*) FROM queries WHERE user_id = :u", u=user["user_id"]) == before
    r = client.put("/api/v1/webhooks/endpoint", json={"url": url}, headers=user["headers"])
    assert r.status_code == 422, r.text
    assert client.get("/api/v1/webhooks/endpoint", headers=user["headers"]).status_code == 404


def test_endpoint_and_secret_routes(client: httpx.Client, stack: Stack, user: dict[str, Any]) -> None:
    h = user["headers"]
    r = client.get("/api/v1/webhooks/endpoint", headers=h)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "webhook_endpoint_not_found"
    assert client.delete("/api/v1/webhooks/endpoint", headers=h).status_code == 404
    secret = _secret(client, user)
    assert secret.startswith("whsec_")
    assert _secret(client, user) == secret
    assert client.put("/api/v1/webhooks/endpoint", json={"url": "https://example.com/h"}, headers=h).status_code == 200
    assert client.get("/api/v1/webhooks/endpoint", headers=h).json()["url"] == "https://example.com/h"
    assert client.delete("/api/v1/webhooks/endpoint", headers=h).status_code == 204
    assert client.get("/api/v1/webhooks/endpoint", headers=h).status_code == 404
    # The secret outlives the endpoint: per-query webhooks are signed with it.
    assert _secret(client, user) == secret
    assert client.get("/api/v1/webhooks/secret").status_code == 401
    assert json.loads(client.put("/api/v1/webhooks/endpoint", json={}, headers=h).text)["error"]["code"]
