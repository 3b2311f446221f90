"""Helpers for the limits tests: API processes with tight limits, parallel submits, admins, Redis keys."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.support.stack import Stack, spawn_api, stop


@contextmanager
def tight_apis(stack: Stack, tmp_path: Path, count: int = 1, **overrides: str) -> Iterator[list[str]]:
    """`count` API processes sharing one fresh limits namespace (a queue name no worker reads)."""
    env = {"QUEUE_NAME": f"aiq.limits.{uuid.uuid4().hex[:8]}", **overrides}
    started = [spawn_api(stack, tmp_path / f"api-{i}.log", **env) for i in range(count)]
    try:
        yield [url for _, url in started]
    finally:
        for proc, _ in started:
            stop(proc)


def submit_in_parallel(
    urls: list[str], headers: dict[str, str], bodies: list[dict[str, Any]], threads: int = 50
) -> list[httpx.Response]:
    """POST every body at once, spread round-robin over the API processes."""
    clients = [httpx.Client(base_url=url, timeout=30) for url in urls]
    try:
        with ThreadPoolExecutor(threads) as pool:
            jobs = [
                pool.submit(clients[i % len(clients)].post, "/api/v1/query", json=body, headers=headers)
                for i, body in enumerate(bodies)
            ]
            return [job.result() for job in jobs]
    finally:
        for c in clients:
            c.close()


def make_admin(db: Engine, user_id: str) -> None:
    with db.begin() as conn:
        conn.execute(text("UPDATE users SET role = 'admin' WHERE id = :id"), {"id": user_id})


def limits_redis(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.settings.redis_url, decode_responses=True)


def key_prefix(queue_name: str) -> str:
    return f"aiq:{queue_name}:lim:"
