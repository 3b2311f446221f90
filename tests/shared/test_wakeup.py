"""The wake-up subscriber against a real Redis on a unix socket (what `aiq dev` and embedded tests use)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from shared.config import Settings
from shared.events import wake_channel
from shared.wakeup import Wakeup
from tests.support.polling import wait_until


@pytest.fixture
def unix_redis() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server binary on this machine")
    # A short directory: unix socket paths are limited to about 100 characters.
    directory = Path(tempfile.mkdtemp(prefix="aiqw"))
    socket = directory / "r.sock"
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--unixsocket",
            str(socket),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(socket.exists, timeout=10)
        yield f"unix://{socket}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.anyio
async def test_subscriber_connects_to_a_unix_socket_redis_and_wakes_a_waiter(unix_redis: str) -> None:
    settings = Settings(jwt_secret_key="k" * 48, redis_url=unix_redis, queue_name=f"aiq.t.{uuid.uuid4().hex[:8]}")  # type: ignore[arg-type]
    wakeup = Wakeup(settings)
    wakeup.start()
    publisher = aioredis.Redis.from_url(unix_redis)
    try:
        await asyncio.wait_for(wakeup.subscribed.wait(), timeout=10)
        query_id = uuid.uuid4()
        with wakeup.watch(query_id, only_terminal=True) as waiter:
            await publisher.publish(wake_channel(settings), f"{query_id} completed")
            assert await waiter.wait(10) is True
    finally:
        await publisher.aclose()
        await wakeup.stop()
