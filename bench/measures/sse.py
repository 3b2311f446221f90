"""SSE: time to first token at the client, and many streams held open by the API.

1. TTFT: open-loop arrivals, each a client that submits and reads `GET /api/v1/query/{id}/events` with an
   SSE client (httpx-sse). Time to first token through AIQ = (first `delta` at the client) - (the moment
   the simulator sent the first body bytes of that query's streamed answer, `/_sim/stats` `first_body_at`).
   Both clocks are this machine's wall clock.
2. Held streams: N clients (2,000; 200 in --quick) each submit a slow stream (one word every 400 ms) and
   hold its SSE stream to the end; the API processes' peak RSS and their CPU over the hold.

The clients run in a process of their own (`python -m bench.measures.sse SPEC OUT`), metered like the loadgen.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
from httpx_sse import aconnect_sse

from bench.context import RunContext
from bench.measures.m2 import percentile
from bench.plan import say
from bench.stack import PY, http_json
from bench.systems import System
from devkit.paths import ROOT

HELD_FULL, HELD_QUICK = 2000, 200
# The TTFT load's ceiling: its clients (httpx-sse, one process) need ~15 ms of CPU per stream, so at half of a fast
# machine's M4 (114/s on 2026-12-01) they, not AIQ, were the bottleneck: P50 5 s. AIQ's own ceiling for streams is
# the client-side scenario's SSE series.
TTFT_MAX_RATE = 40
# A slow stream: 20 words, one every 400 ms (8 s), so every stream is open at once.
HELD_PROMPT = "[[sim tokens=20 chunk_ms=400]] hold"


async def _one(client: httpx.AsyncClient, token: str, prompt: str, out: list[dict[str, Any]]) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    rec: dict[str, Any] = {"start": time.time()}
    try:
        r = await client.post("/api/v1/query", json={"query": f"{prompt} {uuid.uuid4()}"}, headers=headers)
        if r.status_code != 202:
            rec["error"] = f"submit {r.status_code}"
            return
        rec["id"] = r.json()["query_id"]
        async with aconnect_sse(client, "GET", f"/api/v1/query/{rec['id']}/events", headers=headers) as source:
            if source.response.status_code != 200:
                rec["error"] = f"events {source.response.status_code}"
                return
            async for sse in source.aiter_sse():
                if sse.event == "delta" and "first_delta" not in rec:
                    rec["first_delta"] = time.time()
                if sse.event in ("completed", "failed", "cancelled"):
                    rec["end"] = sse.event
                    rec["done"] = time.time()
                    break
    except httpx.HTTPError as exc:
        rec["error"] = type(exc).__name__
    finally:
        out.append(rec)


async def _run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=spec["clients"] + 16, max_keepalive_connections=spec["clients"] + 16)
    timeout = httpx.Timeout(120, connect=30)
    async with httpx.AsyncClient(base_url=spec["api"], limits=limits, timeout=timeout) as client:
        tokens = spec["tokens"]
        tasks = []
        started = time.monotonic()
        for i in range(spec["count"]):
            if spec["rate"]:
                # Open loop: the i-th arrival at i / rate, whatever the server does.
                delay = started + i / spec["rate"] - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, tokens[i % len(tokens)], spec["prompt"], out)))
        await asyncio.gather(*tasks)
    return {"records": out}


def _client(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    started = time.process_time()
    result = asyncio.run(_run_spec(spec))
    result["cpu_s"] = time.process_time() - started
    Path(out_path).write_text(json.dumps(result))


def _start_clients(ctx: RunContext, spec: dict[str, Any]) -> tuple[subprocess.Popen[bytes], Path]:
    name = uuid.uuid4().hex[:8]
    spec_path, out_path = ctx.tmp / f"sse-spec-{name}.json", ctx.tmp / f"sse-result-{name}.json"
    spec_path.write_text(json.dumps(spec))
    return subprocess.Popen([PY, "-m", "bench.measures.sse", str(spec_path), str(out_path)], cwd=ROOT), out_path


def _first_body_at(ctx: RunContext, ids: list[str]) -> dict[str, float]:
    found: dict[str, float] = {}
    for i in range(0, len(ids), 100):
        chunk = ids[i : i + 100]
        query = "&".join(f"query_id={q}" for q in chunk)
        found.update(http_json("GET", f"{ctx.sim.url}/_sim/stats?{query}").get("first_body_at", {}))
    return found


def _ms(values: list[float]) -> dict[str, float | None]:
    def q(p: float) -> float | None:
        v = percentile(values, p)
        return round(v, 2) if v is not None else None

    return {"p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "n": len(values)}


def measure_ttft(ctx: RunContext, system: System, rate: float, duration: float) -> dict[str, Any]:
    """Open-loop submit + SSE clients at `rate` (at most TTFT_MAX_RATE, whoever asks); TTFT at the client minus
    the simulator's first body bytes."""
    asked, rate = rate, min(rate, TTFT_MAX_RATE)
    ctx.sim.latency(200)
    system.settle(ctx.sim)
    ctx.gate.wait()
    count = max(1, round(rate * duration))
    say(f"{system.name} SSE TTFT: {rate:.0f}/s for {duration:.0f} s, each a submit and an SSE client")
    spec = {"api": f"http://127.0.0.1:{system.api_port}", "tokens": system.tokens, "rate": rate, "count": count}
    spec.update({"clients": min(count, 4000), "prompt": "[[sim tokens=32]] first token"})
    meter = system.meter(ctx.sim)
    before = meter.snapshot()
    proc, out_path = _start_clients(ctx, spec)
    proc.wait()
    result = json.loads(out_path.read_text())
    records = result["records"]
    cpu = meter.delta(before, meter.snapshot(), {"sse_clients": result["cpu_s"]})
    sent = _first_body_at(ctx, [r["id"] for r in records if "id" in r])
    ttft = [(r["first_delta"] - sent[r["id"]]) * 1000 for r in records if "first_delta" in r and r["id"] in sent]
    submit_to_first = [(r["first_delta"] - r["start"]) * 1000 for r in records if "first_delta" in r]
    errors = [r.get("error") or r.get("end") for r in records if r.get("end") != "completed"]
    stats = {
        "rate": rate,
        "rate_asked": asked,
        "duration_s": duration,
        "streams": len(records),
        "errors": len(errors),
        "error_kinds": sorted({str(e) for e in errors})[:5],
        "ttft_through_aiq": _ms(ttft),
        "submit_to_first_delta": _ms(submit_to_first),
        "cpu": cpu,
    }
    say(
        f"{system.name} SSE TTFT: p50 {stats['ttft_through_aiq']['p50_ms']} ms, p99 "
        f"{stats['ttft_through_aiq']['p99_ms']} ms over {len(ttft)} streams ({len(errors)} errors)"
    )
    return stats


def measure_held_streams(ctx: RunContext, system: System, clients: int) -> dict[str, Any]:
    """`clients` SSE streams on slow answers held at once: the API processes' peak RSS and CPU."""
    ctx.sim.latency(0)
    system.settle(ctx.sim)
    ctx.gate.wait()
    say(f"{system.name} SSE held: {clients} clients, each holding a ~8 s slow stream")
    spec = {"api": f"http://127.0.0.1:{system.api_port}", "tokens": system.tokens, "rate": 0, "count": clients}
    spec.update({"clients": clients, "prompt": HELD_PROMPT})
    api_procs = [p for proc in system.api for p in proc.tree()]
    meter = system.meter(ctx.sim)
    before = meter.snapshot()
    rss_before = sum(_rss(p) for p in api_procs)
    proc, out_path = _start_clients(ctx, spec)
    peak = rss_before
    while proc.poll() is None:
        peak = max(peak, sum(_rss(p) for p in api_procs))
        time.sleep(0.25)
    result = json.loads(out_path.read_text())
    records = result["records"]
    cpu = meter.delta(before, meter.snapshot(), {"sse_clients": result["cpu_s"]})
    done = [r for r in records if r.get("end") == "completed"]
    stats = {
        "clients": clients,
        "api_processes": len(system.api),
        "completed_streams": len(done),
        "errors": len(records) - len(done),
        "error_kinds": sorted({str(r.get("error") or r.get("end")) for r in records if r not in done})[:5],
        "api_rss_mb_before": round(rss_before / 2**20, 1),
        "api_rss_mb_peak": round(peak / 2**20, 1),
        "stream_s": _ms([(r["done"] - r["start"]) * 1000 for r in done]),
        "cpu": cpu,
    }
    say(
        f"{system.name} SSE held: {len(done)}/{clients} streams completed, API RSS {stats['api_rss_mb_before']} → "
        f"{stats['api_rss_mb_peak']} MB"
    )
    return stats


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0


def measure_sse(ctx: RunContext, system: System, rate: float) -> dict[str, Any]:
    """Both SSE figures; `rate` is the TTFT load asked for (`measure_ttft` caps it at TTFT_MAX_RATE)."""
    duration = 5.0 if ctx.plan.quick else 15.0
    return {
        "ttft": measure_ttft(ctx, system, rate, duration),
        "held": measure_held_streams(ctx, system, HELD_QUICK if ctx.plan.quick else HELD_FULL),
    }


def sse_headline(sse: dict[str, Any]) -> dict[str, Any]:
    """The JSON's top-level SSE figures."""
    ttft, held = sse["ttft"], sse["held"]
    return {
        "sse_ttft_p50_ms": ttft["ttft_through_aiq"]["p50_ms"],
        "sse_ttft_p99_ms": ttft["ttft_through_aiq"]["p99_ms"],
        "sse_ttft_rate": ttft["rate"],
        "sse_held_streams": held["completed_streams"],
        "sse_held_clients": held["clients"],
        "sse_held_api_rss_mb_peak": held["api_rss_mb_peak"],
        "sse_held_api_cpu_s": (held["cpu"] or {}).get("cpu_s", {}).get("api"),
    }


if __name__ == "__main__":
    _client(sys.argv[1], sys.argv[2])
