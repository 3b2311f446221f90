"""The API in the test process, driven at the ASGI level: for what no real client can make a server do."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from fastapi import FastAPI
from starlette.requests import ClientDisconnect
from starlette.types import Message

from api.main import create_app
from shared.config import Settings


@asynccontextmanager
async def in_process_api(settings: Settings) -> AsyncIterator[FastAPI]:
    """The real app on the stack's database and Redis, its lifespan run (no metrics port of its own)."""
    app = create_app(settings.model_copy(update={"api_metrics_port": 0}))
    async with app.router.lifespan_context(app):
        yield app


async def serve_to_a_gone_client(
    app: FastAPI, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> None:
    """One request served as an ASGI 2.4 server serves a client that left before the answer: the request arrives
    whole, then every `send` raises `OSError` (the spec's way to say the client is gone), the response start too."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in {**headers, "Content-Length": str(len(body))}.items()],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        raise OSError("the client is gone")

    with pytest.raises(ClientDisconnect):
        await app(scope, receive, send)
