"""The worker side of webhooks: one delivery attempt per `webhooks.deliver` message, and the sweep that
sends the messages of due deliveries (retries after their delay, and any whose message was lost)."""

from __future__ import annotations

import asyncio
import logging
import random
import uuid

from shared.services import webhooks
from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


async def deliver(rt: WorkerRuntime, delivery_id: uuid.UUID) -> webhooks.DeliveryOutcome:
    """One attempt; the row decides whether anything is sent."""
    return await webhooks.deliver(rt.raw_pool, rt.settings, delivery_id)


async def sweep_loop(rt: WorkerRuntime) -> None:
    """Every sweep interval: re-send due deliveries (long retry delays live in the row, never in an ETA)."""
    while True:
        await asyncio.sleep(rt.settings.sweep_interval_seconds * random.uniform(0.8, 1.2))
        try:
            sent = await webhooks.sweep(rt.raw_pool, rt.publisher, rt.settings)
            if sent:
                log.info("webhook sweep", extra={"count": sent})
        except Exception as exc:  # noqa: BLE001 - the next sweep tries again
            log.warning("webhook sweep failed", extra={"error": type(exc).__name__})
