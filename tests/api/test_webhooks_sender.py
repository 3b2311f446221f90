"""The webhook sender without the stack: signatures checked by the Standard Webhooks reference library,
and every SSRF refusal (none of them ever opens a connection)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from shared.config import Settings
from shared.webhooks import (
    address_refusal,
    new_secret,
    now_timestamp,
    parse_retry_after,
    send,
    signature_headers,
    validate_url,
)

PROD = Settings(environment="production", jwt_secret_key="x" * 40)
DEV = Settings(environment="development")


def test_signature_verifies_with_the_reference_library() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    body = json.dumps({"type": "query.completed", "data": {"query_id": "q"}}).encode()
    headers = signature_headers([secret], "msg_1", now_timestamp(), body)
    assert Webhook(secret).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)


def test_rotation_signs_with_both_secrets_space_separated() -> None:
    old, new = new_secret(), new_secret()
    body = b'{"type":"query.failed"}'
    headers = signature_headers([new, old], "msg_2", now_timestamp(), body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert all(sig.startswith("v1,") for sig in headers["webhook-signature"].split(" "))
    for secret in (old, new):
        Webhook(secret).verify(body, headers)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("169.254.10.10", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "reserved"),
        ("240.0.0.1", "reserved"),
        ("fc00::1", "private"),
        ("::ffff:127.0.0.1", "IPv4-mapped"),
        ("::ffff:8.8.8.8", "IPv4-mapped"),
        ("2002:7f00:1::", "embedding"),
        ("64:ff9b::a00:1", "embedding"),
        ("192.0.2.1", "private"),
    ],
)
def test_every_non_public_address_is_refused(address: str, reason: str) -> None:
    refusal = address_refusal(ipaddress.ip_address(address))
    assert refusal is not None
    assert reason in refusal


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://example.com/hook", "https"),
        ("ftp://example.com/hook", "https"),
        ("https://", "host"),
        ("https://user:pw@example.com/", "credentials"),
        ("https://10.0.0.1/hook", "private"),
        ("https://[::1]/hook", "loopback"),
        ("https://169.254.169.254/latest/meta-data", "metadata"),
        ("https://localhost/hook", "local host"),
        ("https://db.internal/hook", "local host"),
        ("https://example.com/" + "a" * 2100, "longer"),
        ("https://exa mple.com/", "spaces"),
        ("https://example.com:99999/", "not valid"),
        # Brackets hold an IPv6 literal; anything else there (an IPvFuture, a name) is not a host.
        ("https://[v1.x]/hook", "not valid"),
        ("https://[example.com]/hook", "not valid"),
    ],
)
def test_bad_urls_are_refused_before_anything_is_stored(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_url(PROD, url)


def test_http_is_allowed_outside_production_and_the_allow_list_opens_private_hosts() -> None:
    assert validate_url(DEV, "http://example.com/hook")
    with pytest.raises(ValueError, match="loopback"):
        validate_url(DEV, "http://127.0.0.1:9/hook")
    allowed = Settings(environment="development", webhook_allowed_hosts="127.0.0.1,10.0.0.0/8")
    assert validate_url(allowed, "http://127.0.0.1:9/hook")
    assert validate_url(allowed, "http://10.9.9.9/hook")


class _Recorder(BaseHTTPRequestHandler):
    hits: list[str]
    status = 200
    extra_headers: dict[str, str] = {}
    body = b""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.hits.append(self.path)
        self.send_response(self.status)
        for key, value in self.extra_headers.items():
            self.send_header(key, value)
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Handler", (_Recorder,), {"hits": [], "extra_headers": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_loopback_receiver_is_refused_without_a_connection(receiver: tuple[str, type[_Recorder]]) -> None:
    url, handler = receiver
    result = asyncio.run(send(DEV, f"{url}/hook", {}, b"{}"))
    assert result.refused
    assert result.error is not None
    assert "loopback" in result.error
    assert handler.hits == []


def test_a_name_that_resolves_inside_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # The resolver's answer is what is checked, not the name: a public-looking name pointing inside is refused.
    async def fake_getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]

    async def run() -> Any:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
        return await send(DEV, "http://hooks.example.com/x", {}, b"{}")

    result = asyncio.run(run())
    assert result.refused
    assert "private" in (result.error or "")


def test_allow_listed_receiver_gets_the_post_and_redirects_are_not_followed(
    receiver: tuple[str, type[_Recorder]],
) -> None:
    url, handler = receiver
    allowed = Settings(environment="development", webhook_allowed_hosts="127.0.0.1")
    result = asyncio.run(send(allowed, f"{url}/hook", {"webhook-id": "m"}, b"{}"))
    assert result.ok
    assert handler.hits == ["/hook"]
    handler.status = 302
    handler.extra_headers = {"location": f"{url}/elsewhere"}
    result = asyncio.run(send(allowed, f"{url}/hook", {}, b"{}"))
    assert result.status_code == 302
    assert not result.ok
    assert handler.hits == ["/hook", "/hook"]


def test_retry_after_is_read_on_429_and_the_answer_is_read_only_up_to_the_cap(
    receiver: tuple[str, type[_Recorder]],
) -> None:
    url, handler = receiver
    allowed = Settings(environment="development", webhook_allowed_hosts="127.0.0.1")
    handler.status = 429
    handler.extra_headers = {"retry-after": "7"}
    handler.body = b"x" * (2 * 1024 * 1024)
    result = asyncio.run(send(allowed, f"{url}/hook", {}, b"{}"))
    assert result.status_code == 429
    assert result.retry_after == 7


def test_a_receiver_that_never_answers_times_out() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        port = listener.getsockname()[1]
        slow = Settings(environment="development", webhook_allowed_hosts="127.0.0.1", webhook_timeout_seconds=0.5)
        result = asyncio.run(send(slow, f"http://127.0.0.1:{port}/hook", {}, b"{}"))
        assert result.error == "timeout"
    finally:
        listener.close()


def test_retry_after_formats() -> None:
    assert parse_retry_after("120") == 120
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 60) == 60
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    # A receiver's header is not ours to trust: non-ASCII digits are "no value", never an exception.
    assert parse_retry_after("\u00b2") is None
    assert parse_retry_after("1\u00b9") is None


def _self_signed(tmp: Any, name: str) -> tuple[str, str]:
    key, cert = str(tmp / f"{name}.key"), str(tmp / f"{name}.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}", "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize(("cert_name", "ok"), [("hooks.example.test", True), ("someone-else.test", False)])
def test_https_goes_to_the_vetted_address_and_still_verifies_the_host_name(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, cert_name: str, ok: bool
) -> None:
    cert, key = _self_signed(tmp_path, cert_name)
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            seen.append(self.headers.get("host"))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    snis: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: snis.append(name)  # type: ignore[assignment,func-returns-value]
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    client_ctx = ssl.create_default_context(cafile=cert)
    monkeypatch.setattr("shared.webhooks._tls_context", lambda: client_ctx)
    resolved: list[str] = []

    async def fake_getaddrinfo(host: str, port_: int, **_: Any) -> list[Any]:
        # The name resolves to the allow-listed loopback address; the request must go there, named by its host.
        resolved.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port_))]

    async def run() -> Any:
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake_getaddrinfo)
        settings = Settings(environment="production", jwt_secret_key="x" * 40, webhook_allowed_hosts="127.0.0.1")
        return await send(settings, f"https://hooks.example.test:{port}/h", {}, b"{}")

    try:
        result = asyncio.run(run())
    finally:
        server.shutdown()
        server.server_close()
    assert resolved == ["hooks.example.test"]
    if ok:
        assert result.ok, result
        assert seen == [f"hooks.example.test:{port}"]
        assert snis == ["hooks.example.test"]
    else:
        assert not result.ok
        assert result.error is not None
        assert result.error.startswith("connection")
        assert seen == []


def test_retry_schedule_spans_about_a_day_with_jitter_and_honours_retry_after() -> None:
    from shared.services.webhooks import retry_delay

    settings = Settings()
    delays = [retry_delay(settings, n, None) for n in range(1, 9)]
    assert delays[-1] is None
    steps = [d for d in delays if d is not None]
    assert len(steps) == 7
    for got, nominal in zip(steps, settings.webhook_retry_delays_seconds, strict=True):
        assert 0.8 * nominal <= got <= 1.2 * nominal
    assert 20 * 3600 <= sum(steps) <= 34 * 3600
    first = retry_delay(settings, 1, 120)
    assert first is not None
    assert first >= 120
    capped = retry_delay(settings, 1, 10**9)
    assert capped is not None
    assert capped <= 24 * 3600


def test_a_resolver_that_hangs_costs_at_most_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    async def slow_getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        await asyncio.sleep(30)
        return []

    async def run() -> Any:
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", slow_getaddrinfo)
        settings = Settings(environment="development", webhook_timeout_seconds=0.3)
        return await asyncio.wait_for(send(settings, "http://hooks.example.com/x", {}, b"{}"), timeout=10)

    result = asyncio.run(run())
    assert result.error is not None
    assert result.error.startswith("timeout")
    assert not result.refused
