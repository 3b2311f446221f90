"""Fixtures of the tests of shared/ code on the real servers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis


@pytest.fixture
async def redis(server_urls: dict[str, str]) -> AsyncIterator[aioredis.Redis]:
    """An asyncio Redis client on the run's Redis server, closed after the test."""
    client = aioredis.Redis.from_url(server_urls["redis"])
    try:
        yield client
    finally:
        await client.aclose()
