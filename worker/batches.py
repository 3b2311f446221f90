"""The worker's side of `/v1/batches`: one step of a batch per `batches.advance` task, and the sweeper's
re-send of overdue steps. The rules live in `shared/services/batches.py`."""

from __future__ import annotations

import uuid

from shared.services import batches as service
from worker.runtime import WorkerRuntime

# Overdue batches re-sent per sweep.
SWEEP_BATCHES = 100


async def advance(rt: WorkerRuntime, batch_id: uuid.UUID) -> float | None:
    """One step of the batch; seconds until the next one, or None when it ended or another worker holds it."""
    return await service.advance(rt.raw_pool, rt.settings, rt.limiter, rt.publisher, rt.events, batch_id)


async def sweep(rt: WorkerRuntime) -> int:
    """Re-send `batches.advance` for live batches whose next step is overdue (its message was lost)."""
    return await service.sweep_overdue(rt.raw_pool, rt.publisher, SWEEP_BATCHES)
