"""Minimal raw-ASGI helpers: typed aliases, JSON responses, body reading, disconnects and dropped connections."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from devkit.simulator._json import dumps

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = Sequence[tuple[bytes, bytes]]

JSON_HEADER = (b"content-type", b"application/json")
SSE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
)


class ClientDisconnected(Exception):
    """The client went away before the request body was read."""


class BodyTooLarge(Exception):
    """The request body exceeds the configured limit."""


async def read_body(receive: Receive, limit: int) -> bytes:
    """Read the whole request body, refusing more than `limit` bytes."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnected
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        # The common case: the whole body arrived in one message, no join needed.
        if len(body) > limit:
            raise BodyTooLarge
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    headers: Headers = (),
    content_type: bytes = b"",
) -> None:
    """Send a complete response with a Content-Length."""
    response_headers = [
        (b"content-type", content_type) if content_type else JSON_HEADER,
        (b"content-length", str(len(body)).encode()),
    ]
    response_headers.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, payload: Any, headers: Headers = ()) -> None:
    """Send `payload` as a JSON response."""
    await send_bytes(send, status, dumps(payload), headers)


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the server reports that the client has gone (call after the body is read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def sleep_unless_disconnected(receive: Receive, seconds: float) -> bool:
    """Sleep up to `seconds`; return True early if the client disconnected meanwhile."""
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        done, _ = await asyncio.wait({watcher}, timeout=seconds)
        return bool(done)
    finally:
        watcher.cancel()


def _transport_of(send: Send) -> asyncio.BaseTransport | None:
    # uvicorn passes the bound `RequestResponseCycle.send` (both the httptools and the h11 protocol),
    # whose owner holds the connection's transport; ASGI itself has no way to reset a connection.
    owner = getattr(send, "__self__", None)
    transport = getattr(owner, "transport", None)
    if transport is not None and callable(getattr(transport, "abort", None)):
        return transport  # type: ignore[no-any-return]
    return None


async def drop_connection(receive: Receive, send: Send) -> None:
    """Close the TCP connection without sending a single byte of response."""
    transport = _transport_of(send)
    if transport is not None:
        transport.abort()  # type: ignore[attr-defined]
        # uvicorn learns about the close one loop tick later (connection_lost); wait for it so it
        # does not log "returned without starting response" and try to write a 500.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wait_for_disconnect(receive), timeout=5)
        return
    # Fallback for servers that hide the transport: promise a body and return without it. The
    # server then has to close the connection mid-response, which clients also see as a
    # connection error (though the status line has already been sent).
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [JSON_HEADER, (b"content-length", b"1024")],
        }
    )
    await send({"type": "http.response.body", "body": b"{", "more_body": True})
