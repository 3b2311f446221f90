"""Talking to the API as a client does: a fresh user, polling a query to its end."""

from __future__ import annotations

import socket
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx

TEST_PASSWORD = "correct horse battery staple"


def register_and_login(client: httpx.Client, password: str = TEST_PASSWORD) -> dict[str, Any]:
    """A fresh user; returns its email, tokens and ready-made auth headers."""
    email = f"user-{uuid.uuid4().hex[:10]}@example.com"
    r = client.post("/api/v1/auth/register", json={"email": email, "password": password})
    assert r.status_code == 201, r.text
    r = client.post("/api/v1/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    tokens = r.json()
    headers = {"Authorization": f"Bearer {tokens['access_token']}"}
    user_id = client.get("/api/v1/users/me", headers=headers).json()["id"]
    return {"email": email, "user_id": user_id, "tokens": tokens, "headers": headers}


def wait_terminal(client: httpx.Client, headers: dict[str, str], query_id: str, timeout: float = 30) -> dict[str, Any]:
    """Poll like a client until the query reaches a terminal state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/api/v1/query/{query_id}", headers=headers).json()
        if body["status"] in ("completed", "failed", "cancelled"):
            return body
        time.sleep(0.1)
    raise TimeoutError(f"query {query_id} not terminal after {timeout}s: {body}")


def send_and_leave(url: str, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> None:
    """Send one request on a raw socket and close it at once, reading nothing: a client gone before any answer."""
    parts = urlsplit(url)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}", *(f"{k}: {v}" for k, v in headers.items())]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80)) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
