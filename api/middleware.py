"""The API's edge: one pure ASGI middleware for request ids, metrics, the body limit and security headers.

Pure ASGI rather than `BaseHTTPMiddleware`: the latter wraps every request in extra tasks and memory
streams, which costs real throughput at the API's >1,000 req/s target and breaks streaming responses.
One layer rather than one per job: every response message (each SSE frame too) then passes one `send`
wrapper instead of four, and the response's headers are copied once.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response, internal_error
from shared.logging import request_id_var
from shared.metrics import HTTP_REQUEST_DURATION, HTTP_REQUESTS

__all__ = [
    "CLIENT_CLOSED",
    "DOCS_CSP",
    "LONG_REQUEST_SCOPE_KEY",
    "REQUEST_ID_HEADER",
    "UNMATCHED_ROUTE",
    "EdgeMiddleware",
    "mark_long_request",
    "request_id_var",
]

# Every path that matched no route shares one label value, so scanners cannot explode the series count.
UNMATCHED_ROUTE = "unmatched"
# The status label of a request whose client left before any response could be sent (nginx's 499): not a 5xx,
# so clients that hang up do not page anyone (AIQApi5xxRatioHigh).
CLIENT_CLOSED = 499
# Unknown verbs are grouped for the same reason.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "OTHER"
# Set (truthy) in the scope by handlers that hold a connection open by design (long-poll, SSE):
# their duration is the client's chosen wait, not latency, and would swamp the latency histogram.
LONG_REQUEST_SCOPE_KEY = "aiq.long_request"

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_HEADER_LOWER = REQUEST_ID_HEADER.lower().encode("latin-1")
# Ids land in logs: bounded length and a charset that cannot forge log lines or inject markup.
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")


# The metrics' children by label values, so that a request costs a dict lookup rather than `labels()` (which
# checks and joins the values under a lock). Bounded: route templates, known methods and status codes.
_children: dict[tuple[Any, ...], Any] = {}


def _child(metric: Any, *values: str) -> Any:
    key = (metric, *values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def mark_long_request(scope: MutableMapping[str, Any]) -> None:
    """Exclude this request from the latency histogram (its count and status are still recorded)."""
    scope[LONG_REQUEST_SCOPE_KEY] = True


def route_label(scope: Scope) -> str:
    """The matched route's full template (`/api/v1/query/{query_id}`), or `unmatched`.

    The router records the match in the scope (the same dict this middleware holds), so it is readable
    once the inner app returns. Recent FastAPI composes included routers lazily: `scope["route"]` is then
    the route as declared in its own router, with a path relative to the routers' prefixes, and the full
    template lives in FastAPI's per-request route context. Prefer that, fall back to the plain route.
    """
    fastapi_scope = scope.get("fastapi")
    context = fastapi_scope.get("effective_route_context") if isinstance(fastapi_scope, dict) else None
    for candidate in (context, scope.get("route")):
        if (path := _template(candidate)) is not None:
            return path
    # Plain Starlette routes of a FastAPI app (/docs, /openapi.json) only leave their endpoint behind.
    endpoint = scope.get("endpoint")
    if endpoint is not None:
        for route in getattr(scope.get("router"), "routes", ()):
            if getattr(route, "endpoint", None) is endpoint and (path := _template(route)) is not None:
                return path
    return UNMATCHED_ROUTE


def _template(route: object) -> str | None:
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) and path else None


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == _REQUEST_ID_HEADER_LOWER:
            return value.decode("ascii") if _VALID_REQUEST_ID.fullmatch(value) else None
    return None


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once a body passes the limit; FastAPI re-raises HTTPExceptions from body parsing."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request body is larger than {limit} bytes")


# Bodies these paths accept besides JSON: the OAuth2 password form of Swagger's Authorize dialog.
FORM_PATHS = frozenset({"/api/v1/auth/login"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def _is_form(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media in (b"application/x-www-form-urlencoded", b"multipart/form-data")


def _error_response(exc: StarletteHTTPException, scope: Scope) -> Response:
    code = "payload_too_large" if exc.status_code == 413 else "unsupported_media_type"
    return error_response(exc.status_code, code, str(exc.detail), path=scope["path"])


NOSNIFF = (b"x-content-type-options", b"nosniff")
# The docs pages load their scripts and styles from this server only (api/static/); Swagger UI and ReDoc
# set inline styles, ReDoc runs its search in a blob: worker, both draw icons from data: URIs.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; worker-src 'self' blob:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_HTML_HEADERS = (
    (b"content-security-policy", DOCS_CSP.encode("ascii")),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
_SECURITY_HEADER_NAMES = frozenset({NOSNIFF[0], *(name for name, _ in _HTML_HEADERS)})


# Names the edge sets itself: whatever the app sent under them is replaced.
_EDGE_HEADER_NAMES = _SECURITY_HEADER_NAMES | {_REQUEST_ID_HEADER_LOWER}


def _edge_headers(headers: Any, request_id: bytes) -> list[tuple[bytes, bytes]]:
    """The response's headers in one pass: `nosniff`, the HTML protections for HTML, and the request id."""
    out: list[tuple[bytes, bytes]] = []
    html = False
    for name, value in headers:
        lower = name.lower()
        if lower in _EDGE_HEADER_NAMES:
            continue
        if lower == b"content-type" and value.startswith(b"text/html"):
            html = True
        out.append((name, value))
    out.append(NOSNIFF)
    if html:
        out.extend(_HTML_HEADERS)
    out.append((_REQUEST_ID_HEADER_LOWER, request_id))
    return out


class EdgeMiddleware:
    """Every HTTP request's edge, in one pure ASGI layer (one `send` wrapper, one pass over the headers):

    - the request id: a valid incoming `X-Request-ID` or a new one, in `request.state.request_id`, in logs
      (`request_id_var`) and echoed in the response; an unhandled error is answered here as a 500 that
      carries it;
    - metrics: requests counted and timed by route template, method and status (an exception counts as a
      500, a client that left before its answer as a 499; long requests, `mark_long_request`, are counted but
      not timed);
    - the body limit: a declared `Content-Length` over the limit is a 413 at once, without reading the body;
      a body without one (chunked) is counted as it arrives and the chunk that passes the limit is a 413, so
      no more than the limit is ever buffered; a non-empty body that is not JSON (`application/json` or
      `application/*+json`) is a 415 `unsupported_media_type`, except the login route's OAuth2 form and the
      upload paths' multipart forms (`uploads`: path → their own byte limit, e.g. `POST /v1/files`);
    - security headers: `X-Content-Type-Options: nosniff` on every response; HTML also gets a CSP, frame and
      referrer protection.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, uploads: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.uploads = uploads or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        # Handlers read it as `request.state.request_id` (e.g. to pass along with a task).
        scope.setdefault("state", {})["request_id"] = request_id
        encoded = request_id.encode("ascii")
        start = time.perf_counter()
        status = 500
        started = False
        gone = False

        async def edge_receive() -> Message:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = True
            return message

        async def edge_send(message: Message) -> None:
            nonlocal status, started, gone
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message = {**message, "headers": _edge_headers(message.get("headers", ()), encoded)}
            try:
                await send(message)
            except OSError:
                # The server says the client is gone (ASGI 2.4).
                gone = True
                raise

        token = request_id_var.set(request_id)
        try:
            try:
                await self._limited(scope, edge_receive, edge_send, lambda: started)
                if not started and gone:
                    # The app saw the client leave and answered nothing (a stream whose client hung up first).
                    status = CLIENT_CLOSED
            except BaseException:
                # Starlette's outer ServerErrorMiddleware would turn this into a 500; count it as one, unless the
                # client was gone.
                status = CLIENT_CLOSED if gone else 500
                raise
            finally:
                method = scope["method"] if scope["method"] in KNOWN_METHODS else OTHER_METHOD
                route = route_label(scope)
                _child(HTTP_REQUESTS, method, route, str(status)).inc()
                if not scope.get(LONG_REQUEST_SCOPE_KEY):
                    _child(HTTP_REQUEST_DURATION, method, route).observe(time.perf_counter() - start)
        except Exception as exc:
            # Starlette answers unhandled errors in its outermost middleware, after the request id is unset:
            # answer here instead, so the 500 and its log line carry the id like any other.
            if started:
                raise
            await internal_error(exc)(scope, receive, edge_send)
        finally:
            request_id_var.reset(token)

    async def _limited(self, scope: Scope, receive: Receive, send: Send, started: Callable[[], bool]) -> None:
        """The app behind the body limit and the content-type check (only methods that carry a body)."""
        if scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        length: int | None = None
        chunked = False
        content_type = b""
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"content-type":
                content_type = value
        upload_limit = self.uploads.get(scope["path"])
        limit = self.max_bytes if upload_limit is None else upload_limit
        if length is not None and length > limit:
            # Answered without reading the body; uvicorn closes the connection if the client keeps sending.
            await _error_response(BodyTooLarge(limit), scope)(scope, receive, send)
            return
        has_body = chunked or bool(length)
        form_allowed = scope["path"] in FORM_PATHS or upload_limit is not None
        if has_body and not _is_json(content_type) and not (form_allowed and _is_form(content_type)):
            error = StarletteHTTPException(415, "Send the request body as JSON with Content-Type: application/json")
            await _error_response(error, scope)(scope, receive, send)
            return

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, counting_receive, send)
        except BodyTooLarge as exc:
            # Raised where no handler turned it into a response (a parser outside FastAPI's body reading).
            if started():
                raise
            await _error_response(exc, scope)(scope, receive, send)
