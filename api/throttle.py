"""Login and registration throttles as route dependencies (the limits themselves live in shared/limits.py).

Each is one parameter on its route, so the auth routes stay as they are otherwise.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request

from api.deps import HandlesDep
from shared.config import Settings
from shared.limits import client_address, limiter_for
from shared.services.auth import normalize_email


def request_address(request: Request, settings: Settings) -> str:
    """The client address: X-Forwarded-For counts only when the peer is one of TRUSTED_PROXIES."""
    peer = request.client.host if request.client else None
    return client_address(peer, request.headers.get("x-forwarded-for"), settings.trusted_proxies)


async def _login_email(request: Request) -> str | None:
    """The email a login names, read the way the route reads it (form or JSON); None if there is none."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw: Any
    try:
        if content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            raw = (await request.form()).get("username")
        else:
            body = json.loads(await request.body() or b"null")
            raw = body.get("email") if isinstance(body, dict) else None
    except (ValueError, RecursionError):
        return None
    # Without a usable email the route answers 422 and checks no password: nothing to throttle (a lone
    # surrogate, which no UTF-8 encoder takes, is not one either).
    if not isinstance(raw, str) or not raw.strip() or not _is_utf8(raw):
        return None
    return normalize_email(raw)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def mark_login_succeeded(request: Request) -> None:
    """The login route calls this once it issues tokens: only then is the failure taken up front given back.
    (A route that returns rather than raises its refusal, as the OAuth2 form's 400 does, still counts.)"""
    request.state.login_succeeded = True


async def throttle_login(request: Request, handles: HandlesDep) -> AsyncIterator[None]:
    """429 while this account or this address is locked out; each attempt counts as a failure up front (so
    parallel guesses cannot slip through) and a success gives it back, clearing this address's count."""
    email = await _login_email(request)
    if email is None:
        yield
        return
    limiter, address = limiter_for(handles.redis, handles.settings), request_address(request, handles.settings)
    await limiter.login_attempt(email, address)
    yield
    if getattr(request.state, "login_succeeded", False):
        await limiter.login_succeeded(email, address)


async def throttle_register(request: Request, handles: HandlesDep) -> None:
    """Registrations per client address (REGISTER_PER_HOUR)."""
    settings = handles.settings
    await limiter_for(handles.redis, settings).register_attempt(request_address(request, settings))


LoginThrottle = Annotated[None, Depends(throttle_login, scope="function")]
RegisterThrottle = Annotated[None, Depends(throttle_register)]
