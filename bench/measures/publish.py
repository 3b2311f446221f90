"""What one publish costs the API: `Publisher.publish` to Redis (LPUSH) and to RabbitMQ (confirmed AMQP publish).

The same `shared.queue.Publisher` the API and the sweeper use, in this process, on its own queue, no workers:
sequential publishes give the latency one submit pays (p50/p99), a window of concurrent publishes gives the
rate one event loop sustains, and this process's CPU time per publish gives the API-side cost. RabbitMQ is
measured when BENCH_AMQP_URL or TEST_AMQP_URL names one; otherwise the row says why it is missing.

    python -m bench.measures.publish            # prints the JSON of both brokers
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any

from shared.config import Settings, redact_url
from shared.queue import Publisher

SEQUENTIAL = 2000
CONCURRENT = 10000
WINDOW = 64


def amqp_url() -> str | None:
    """The RabbitMQ to measure against, if any."""
    return os.environ.get("BENCH_AMQP_URL") or os.environ.get("TEST_AMQP_URL") or None


def measure_publish(redis_url: str, amqp: str | None = None, quick: bool = False) -> dict[str, Any]:
    """Both brokers' publish cost; RabbitMQ's entry explains itself when there is none to measure."""
    scale = 0.25 if quick else 1.0
    result: dict[str, Any] = {"redis": _measure(Settings(redis_url=redis_url, jwt_secret_key="b" * 48), scale)}  # type: ignore[arg-type]
    if amqp:
        settings = Settings(redis_url=redis_url, broker_url=amqp, jwt_secret_key="b" * 48)  # type: ignore[arg-type]
        result["rabbitmq"] = _measure(settings, scale)
    else:
        result["rabbitmq"] = {"skipped": "no RabbitMQ: set BENCH_AMQP_URL (or TEST_AMQP_URL)"}
    return result


def _measure(base: Settings, scale: float) -> dict[str, Any]:
    settings = base.model_copy(update={"queue_name": f"aiq.bench.publish.{uuid.uuid4().hex[:8]}"})
    try:
        return asyncio.run(_run(settings, int(SEQUENTIAL * scale), int(CONCURRENT * scale)))
    finally:
        _delete_queue(settings)


async def _run(settings: Settings, sequential: int, concurrent: int) -> dict[str, Any]:
    publisher = Publisher(settings)
    try:
        # Connection set-up (and, on RabbitMQ, the queue's declaration) stays out of the figures.
        for _ in range(20):
            assert await publisher.publish(uuid.uuid4()), "warm-up publish failed"
        latencies: list[float] = []
        failed = 0
        cpu0 = time.process_time()
        for _ in range(sequential):
            started = time.perf_counter()
            failed += not await publisher.publish(uuid.uuid4())
            latencies.append(time.perf_counter() - started)
        sequential_cpu = time.process_time() - cpu0

        window = asyncio.Semaphore(WINDOW)

        async def one() -> bool:
            async with window:
                return await publisher.publish(uuid.uuid4())

        cpu0, wall0 = time.process_time(), time.perf_counter()
        outcomes = await asyncio.gather(*(one() for _ in range(concurrent)))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        failed += outcomes.count(False)
        depth = await publisher.depth()
    finally:
        await publisher.aclose()
    latencies.sort()
    return {
        "broker": redact_url(settings.broker_url),
        "sequential": sequential,
        "p50_ms": round(1000 * statistics.median(latencies), 3),
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 3),
        "cpu_ms_per_publish": round(1000 * sequential_cpu / sequential, 3),
        "concurrent": concurrent,
        "window": WINDOW,
        "concurrent_per_s": round(concurrent / wall),
        "concurrent_cpu_ms_per_publish": round(1000 * cpu / concurrent, 3),
        "failed": failed,
        # Every confirmed publish is in the queue: nothing was acknowledged and lost.
        "queued": depth,
        "expected_queued": 20 + sequential + concurrent,
    }


def _delete_queue(settings: Settings) -> None:
    with contextlib.suppress(Exception):
        if settings.broker_is_amqp:
            from kombu import Connection

            with Connection(settings.broker_url, connect_timeout=5) as conn, conn.channel() as channel:
                channel.queue_delete(settings.queue_name)
        else:
            import redis

            redis.Redis.from_url(settings.redis_url).delete(settings.queue_name)


if __name__ == "__main__":
    redis_url = os.environ.get("TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"
    print(json.dumps(measure_publish(redis_url, amqp_url(), quick="--quick" in sys.argv), indent=2))
