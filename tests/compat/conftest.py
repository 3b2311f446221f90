"""Fixtures of the `/v1` tests: an AIQ API key and the official `openai` SDK's clients pointed at the stack."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.support.stack import Stack


def make_api_key(client: httpx.Client, user: dict[str, Any]) -> str:
    r = client.post("/api/v1/keys", json={"name": "openai sdk"}, headers=user["headers"])
    assert r.status_code == 201, r.text
    key: str = r.json()["key"]
    return key


@pytest.fixture
def api_key(client: httpx.Client, user: dict[str, Any]) -> str:
    """An AIQ API key (`aiq_…`) of a fresh user, the SDK's `api_key`."""
    return make_api_key(client, user)


@pytest.fixture
def sdk(stack: Stack, api_key: str) -> Iterator[openai.OpenAI]:
    """The sync SDK client on AIQ's `/v1`; its own retries off, so every status is seen as sent."""
    with openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=api_key, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
async def async_sdk(stack: Stack, api_key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    """The async SDK client on AIQ's `/v1`."""
    async with openai.AsyncOpenAI(base_url=f"{stack.api_url}/v1", api_key=api_key, max_retries=0, timeout=60) as c:
        yield c
