"""Webhook mechanics: Standard Webhooks signatures, URL rules and the SSRF-safe sender.

The sender resolves the host once, refuses any address that is not public (unless the operator allow-listed
it), then connects to that very address (TLS still verifies the host name), so a DNS answer that changes
between the check and the connect cannot steer it inside. It never follows redirects, bounds connect, read
and the whole attempt by time, and reads at most `MAX_RESPONSE_BYTES` of the answer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import secrets
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import lru_cache
from urllib.parse import urlsplit

import httpx

from shared.config import Environment, Settings

SECRET_PREFIX = "whsec_"  # noqa: S105 - the Standard Webhooks secret prefix, not a secret
MAX_URL_CHARS = 2048
MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = "AIQ-Webhooks/1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Cloud metadata services: refused by name even where a broader rule would also catch them.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class RefusedDestination(Exception):
    """The URL or the address it resolves to may not be reached; the message says why (no secrets in it)."""


def new_secret() -> str:
    """A fresh signing secret: `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64 HMAC-SHA256>` signature of `{id}.{timestamp}.{body}` with the secret's decoded bytes."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signature_headers(secrets_: list[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers; one signature per live secret, space-separated."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, msg_id, timestamp, body) for s in secrets_),
    }


def address_refusal(ip: IPAddress) -> str | None:
    """Why a resolved address may not be reached, or None for a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "IPv4-mapped IPv6 address"
        if ip.sixtofour is not None or ip.teredo is not None or ip in NAT64:
            return "IPv6 address embedding an IPv4 address"
    if ip in METADATA_ADDRESSES:
        return "cloud metadata address"
    if ip.is_loopback:
        return "loopback address"
    if ip.is_link_local:
        return "link-local address"
    if ip.is_multicast:
        return "multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in CGNAT:
        return "shared (CGNAT) address"
    if ip.is_unspecified or ip.is_reserved:
        return "reserved address"
    if ip.is_private:
        return "private address"
    if not ip.is_global:
        return "non-global address"
    return None


def _allowed(settings: Settings, host: str, ip: IPAddress | None) -> bool:
    for entry in settings.webhook_allowed_hosts:
        if entry == host:
            return True
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def validate_url(settings: Settings, url: str) -> str:
    """A webhook URL as given at submit or on the endpoint; raises ValueError saying what is wrong."""
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"URL is longer than {MAX_URL_CHARS} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url) or not url.isascii():
        raise ValueError("URL must be ASCII without spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError("URL is not valid") from exc
    https_only = settings.environment is Environment.PRODUCTION
    if parts.scheme != "https" and not (parts.scheme == "http" and not https_only):
        raise ValueError("URL must use https" if https_only else "URL must use http or https")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError("URL must name a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("URL must not carry credentials")
    if port == 0:
        raise ValueError("URL port is not valid")
    if parts.fragment:
        raise ValueError("URL must not have a fragment")
    ip = _literal(host)
    if "[" in parts.netloc and (ip is None or ip.version != 6):
        # Brackets hold an IPv6 literal; urlsplit also takes an IPvFuture (`[v1.x]`), which nothing resolves.
        raise ValueError("URL is not valid")
    if ip is not None and not _allowed(settings, host, ip):
        reason = address_refusal(ip)
        if reason:
            raise ValueError(f"URL points at a {reason}")
    local = host == "localhost" or host.endswith((".localhost", ".internal", ".local"))
    if local and not _allowed(settings, host, None):
        raise ValueError("URL points at a local host name")
    return url


async def resolve(settings: Settings, host: str, port: int) -> IPAddress:
    """The address to connect to: every address the name resolves to must be allowed; the first is used."""
    literal = _literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise RefusedDestination("host name does not resolve") from exc
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addresses:
        raise RefusedDestination("host name does not resolve")
    for ip in addresses:
        reason = address_refusal(ip)
        if reason and not _allowed(settings, host, ip):
            raise RefusedDestination(f"{host} resolves to a {reason}")
    return addresses[0]


@dataclass(frozen=True, slots=True)
class SendResult:
    """One attempt: the receiver's status code, or the error that stopped it (`refused: …`, `timeout`, …)."""

    status_code: int | None
    error: str | None = None
    retry_after: float | None = None
    refused: bool = False

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    # Built once per process: loading the CA bundle costs milliseconds.
    return ssl.create_default_context()


async def send(settings: Settings, url: str, headers: dict[str, str], body: bytes) -> SendResult:
    """POST `body` to `url` once, SSRF-safe; never raises for what the network or the receiver does.

    Bounded in time: resolving by WEBHOOK_TIMEOUT_SECONDS, connect and each read by it, the request by twice it.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    timeout = settings.webhook_timeout_seconds
    try:
        validate_url(settings, url)
        async with asyncio.timeout(timeout):
            ip = await resolve(settings, host, port)
    except (ValueError, RefusedDestination) as exc:
        return SendResult(None, error=f"refused: {exc}"[:200], refused=True)
    except TimeoutError:
        return SendResult(None, error="timeout: resolving the host name")
    netloc = f"[{ip}]" if ip.version == 6 else str(ip)
    target = f"{parts.scheme}://{netloc}:{port}{parts.path or '/'}" + (f"?{parts.query}" if parts.query else "")
    default_port = port == (443 if secure else 80)
    request_headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "host": host if default_port else f"{host}:{port}",
        **headers,
    }
    extensions = {"sni_hostname": host} if secure else {}
    try:
        async with (
            asyncio.timeout(timeout * 2),
            httpx.AsyncClient(
                verify=_tls_context(),
                trust_env=False,
                follow_redirects=False,
                timeout=httpx.Timeout(timeout, connect=timeout),
            ) as client,
        ):
            request = client.build_request("POST", target, content=body, headers=request_headers, extensions=extensions)
            response = await client.send(request, stream=True)
            try:
                read = 0
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read >= MAX_RESPONSE_BYTES:
                        break
            finally:
                await response.aclose()
    except TimeoutError:
        return SendResult(None, error="timeout")
    except httpx.TimeoutException:
        return SendResult(None, error="timeout")
    except httpx.HTTPError as exc:
        return SendResult(None, error=f"connection: {type(exc).__name__}")
    except (OSError, ssl.SSLError) as exc:
        return SendResult(None, error=f"connection: {type(exc).__name__}")
    retry_after = None
    if response.status_code in (429, 503):
        retry_after = parse_retry_after(response.headers.get("retry-after"))
    return SendResult(response.status_code, retry_after=retry_after)


def now_timestamp() -> int:
    """The `webhook-timestamp` of an attempt: whole seconds since the epoch."""
    return int(datetime.now(UTC).timestamp())
