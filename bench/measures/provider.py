"""The provider-limited scenario (issue 11): a strict provider, 4 workers, one user's burst and two latecomers.

The simulator enforces a requests-per-minute limit and a tokens-per-minute limit that binds about as often,
with a one-second burst, and advertises them in OpenAI's `x-ratelimit-*` headers. User A submits a backlog
at once; users B and C submit 10 queries each a few seconds later. Run twice: with the limits learned (no
configuration) and configured (`UPSTREAM_LIMITS`). Reported: the provider's 429s as a share of all calls,
A's drain time against the ideal (what the limits allow), B's and C's slowest query from submit to finish,
failures, and attempts beyond one per query.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from bench.context import RunContext
from bench.plan import MODEL, say
from bench.stack import pg
from bench.systems import Layout, Simulator, start_aiq

LATENCY_MS = 200
MAX_TOKENS = 100
# About 22 prompt tokens (4 characters each) + max_tokens: what the provider counts per call.
PROMPT = "Summarize in one line why shaping load to a provider's rate limit beats retrying on 429."
LATECOMERS = 10


def _scale(quick: bool) -> tuple[int, int, float]:
    """(requests per minute, A's backlog, seconds before B and C submit)."""
    return (1200, 240, 2.0) if quick else (3000, 2000, 3.0)


def _tokens_per_call() -> int:
    return -(-len(PROMPT) // 4) + MAX_TOKENS + 8


def run_provider(ctx: RunContext) -> dict[str, Any]:
    """Both modes on a strict simulator of their own; each mode's summary."""
    rpm, backlog, delay = _scale(ctx.plan.quick)
    tpm = rpm * _tokens_per_call()
    sim = Simulator(
        ctx.launcher,
        {**os.environ, "PYTHONUNBUFFERED": "1"},
        name="strict-simulator",
        extra_args=(
            *("--limit-rpm", str(rpm), "--limit-tpm", str(tpm), "--limit-burst-seconds", "1"),
            *("--latency-ms", str(LATENCY_MS)),
        ),
    )
    out: dict[str, Any] = {"rpm": rpm, "tpm": tpm, "burst_seconds": 1, "latency_ms": LATENCY_MS, "backlog": backlog}
    try:
        for mode in ("learned", "configured"):
            env = ("UPSTREAM_LIMITS=" + f"{MODEL}=rpm:{rpm},tpm:{tpm}",) if mode == "configured" else ()
            out[mode] = _one_mode(ctx, sim, mode, env, rpm, tpm, backlog, delay)
    finally:
        ctx.launcher.stop_group([sim.proc], timeout=5)
    return out


def _one_mode(
    ctx: RunContext,
    sim: Simulator,
    mode: str,
    env: tuple[str, ...],
    rpm: int,
    tpm: int,
    backlog: int,
    delay: float,
) -> dict[str, Any]:
    layout = Layout(1, "reuseport", 4, (*ctx.layout.aiq_env, *env), ())
    say(f"provider-limited ({mode}): {rpm} rpm / {tpm} tpm, 4 workers, A submits {backlog}, B and C {LATECOMERS}")
    aiq = start_aiq(ctx.launcher, ctx.servers, sim, layout, ctx.aiq_api_env)
    try:
        sim.reset()
        users = list(aiq.token_by_user.items())[:3]
        base = f"http://127.0.0.1:{aiq.api_port}/api/v1"
        started = time.monotonic()
        a_ids = _submit(base, users[0][1], backlog)
        time.sleep(max(0.0, delay - (time.monotonic() - started)))
        late = {"B": _submit(base, users[1][1], LATECOMERS), "C": _submit(base, users[2][1], LATECOMERS)}
        rows = _wait(aiq.db_url, [*a_ids, *late["B"], *late["C"]], timeout=60 + 3 * backlog * 60 / rpm)
        stats = sim.stats()
    finally:
        ctx.launcher.stop_group([*aiq.workers, *aiq.api], timeout=10)
    a_rows = [rows[i] for i in a_ids if i in rows]
    ideal = max((backlog - rpm / 60) / (rpm / 60), (backlog * _tokens_per_call() - tpm / 60) / (tpm / 60), 0.0)
    drain = _span(a_rows)
    calls, throttled = stats.get("total_calls", 0), stats.get("rate_limited_calls", 0)
    result = {
        "calls": calls,
        "provider_429": throttled,
        "provider_429_share": round(throttled / calls, 4) if calls else None,
        "a_drain_s": drain,
        # Part of the drain: how long A's submits took through the API (the clock starts at the first).
        "a_submit_s": _submit_span(a_rows),
        "a_ideal_drain_s": round(ideal, 2),
        "a_drain_vs_ideal": round(drain / ideal, 3) if drain is not None and ideal else None,
        "late_slowest_s": {user: _slowest([rows[i] for i in ids if i in rows]) for user, ids in late.items()},
        "failed": sum(1 for r in rows.values() if r["status"] != "completed"),
        "extra_attempts": sum(max(0, r["attempts"] - 1) for r in rows.values()),
        "unfinished": len(a_ids) + 2 * LATECOMERS - len(rows),
    }
    say(
        f"  {mode}: 429s {throttled}/{calls}, A drained in {drain} s (ideal {ideal:.1f} s), "
        f"B/C slowest {result['late_slowest_s']}, failed {result['failed']}"
    )
    return result


def _submit(base: str, token: str, n: int) -> list[str]:
    headers = {"Authorization": f"Bearer {token}"}
    body = {"query": PROMPT, "model": MODEL, "max_tokens": MAX_TOKENS}

    def one(client: httpx.Client) -> str:
        r = client.post(f"{base}/query", json=body, headers=headers)
        r.raise_for_status()
        query_id: str = r.json()["query_id"]
        return query_id

    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda _: one(client), range(n)))


def _wait(db_url: str, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(pg(db_url)) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT id::text, status, attempts, created_at, finished_at FROM queries WHERE id::text = ANY(%s)",
                (ids,),
            )
            rows = {
                r[0]: {"status": r[1], "attempts": r[2], "created_at": r[3], "finished_at": r[4]}
                for r in cur.fetchall()
            }
        done = [r for r in rows.values() if r["finished_at"] is not None]
        if len(done) == len(ids) or time.monotonic() > deadline:
            return {k: v for k, v in rows.items() if v["finished_at"] is not None}
        time.sleep(0.5)


def _span(rows: list[dict[str, Any]]) -> float | None:
    if not rows:
        return None
    span = max(r["finished_at"] for r in rows) - min(r["created_at"] for r in rows)
    return round(float(span.total_seconds()), 2)


def _submit_span(rows: list[dict[str, Any]]) -> float | None:
    if not rows:
        return None
    return round(float((max(r["created_at"] for r in rows) - min(r["created_at"] for r in rows)).total_seconds()), 2)


def _slowest(rows: list[dict[str, Any]]) -> float | None:
    if not rows:
        return None
    return round(max(float((r["finished_at"] - r["created_at"]).total_seconds()) for r in rows), 2)
