"""Batch throughput through the OpenAI-compatible door: lines/s from create to completed, and CPU per line.

One JSONL file of `lines` chat completion requests is uploaded with the official `openai` SDK, a batch is
created on it and polled until it ends. The figure is the batch's own wall time (created_at → completed_at,
as the API reports it) and the CPU every role spent meanwhile, per line: the batch path (API, worker,
PostgreSQL, Redis) and everything (the simulator too). Expansion, the queries and the output file are all in
it, so it is the whole cost of a line, not of a submit.
"""

from __future__ import annotations

import json
import time
from typing import Any

import openai

from bench.context import RunContext
from bench.plan import MODEL, PROMPT, say
from bench.stack import CpuMeter
from bench.systems import System

BATCH_PATH_ROLES = ("api", "worker", "postgres", "redis")


def batch_file(lines: int) -> bytes:
    """`lines` chat completion requests, one per line."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    return b"".join(
        json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}).encode()
        + b"\n"
        for i in range(lines)
    )


def measure_batch(ctx: RunContext, system: System, lines: int = 2000, timeout: float = 300) -> dict[str, Any]:
    """Run one batch of `lines` lines to its end; lines/s and CPU-ms per line."""
    say(f"{system.name} batch: {lines} lines through /v1/files and /v1/batches")
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{system.api_port}/v1", api_key=system.tokens[0], max_retries=0, timeout=120
    )
    meter = system.meter(ctx.sim)
    with client:
        uploaded = client.files.create(file=("bench.jsonl", batch_file(lines)), purpose="batch")
        before = meter.snapshot()
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + timeout
        while batch.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
            time.sleep(0.5)
            batch = client.batches.retrieve(batch.id)
        cpu = CpuMeter.delta(before, meter.snapshot())
    counts = batch.request_counts
    wall = (batch.completed_at or 0) - batch.created_at if batch.completed_at else None
    roles = cpu["cpu_s"]
    path_s = sum(roles.get(k, 0.0) for k in BATCH_PATH_ROLES)
    all_s = sum(v for k, v in roles.items() if k not in ("other", "harness"))
    summary = {
        "lines": lines,
        "status": batch.status,
        "completed": counts.completed if counts else None,
        "failed": counts.failed if counts else None,
        # created_at/completed_at are whole seconds: a short batch's figure is coarse.
        "wall_s": wall,
        "lines_per_s": round(lines / wall, 1) if wall else None,
        "batch_path_cpu_ms_per_line": round(1000 * path_s / lines, 3),
        "all_cpu_ms_per_line": round(1000 * all_s / lines, 3),
        "cpu": cpu,
    }
    say(
        f"  batch {batch.status}: {summary['lines_per_s']} lines/s, "
        f"{summary['batch_path_cpu_ms_per_line']} CPU-ms/line on the batch path"
    )
    system.settle(ctx.sim)
    return summary
