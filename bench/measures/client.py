"""The client-side scenario: whole clients (ask, then wait for the answer), open loop, AIQ beside LiteLLM.

Its own stack, one API process and one worker process, and the simulator at 0.5 s. Each step sends
arrivals at one rate for `client_step_s` seconds (bench/clientgen.py, its own process); per step: answers/s,
the overhead each client saw over the upstream's 0.5 s (P50/P99), errors, and the CPU-ms per answer of
every process involved (API, worker, the PostgreSQL backends of this run's database, Redis, simulator,
load generator). AIQ is asked four ways: submit then long-poll, submit with `Prefer: wait` (one request), the
SSE stream, and LiteLLM's own request at `/v1/chat/completions`. The same clients at the same rates go to the
LiteLLM proxy (bench/peers/litellm.py), running beside AIQ on the same simulator: at each rate every series takes
its step in turn (`run_series`), so AIQ and its peer meet the same machine however its speed drifts.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
from collections.abc import Callable
from typing import Any

from bench import profiling
from bench.context import RunContext
from bench.measures.steps import midpoint
from bench.peers import litellm
from bench.plan import CLIENT_P99_MS, MAX_ERROR_RATE, MODEL, PROMPT, Plan, say
from bench.stack import PY, CpuMeter, http_json
from bench.systems import Layout, System, aiq_api_env, start_aiq
from devkit.paths import ROOT

UPSTREAM_MS = 500
# Full plan: after the steps, this many halvings of the gap above the top step, on multiples of REFINE_GRAIN/s.
REFINE_STEPS, REFINE_GRAIN = 2, 5
# A synchronous chat completion, the request LiteLLM and AIQ's `/v1` both answer.
CHAT_BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]})


def run_client(ctx: RunContext) -> dict[str, Any]:
    """AIQ asked four ways and LiteLLM, side by side: at each rate every series takes its step in turn."""
    out: dict[str, Any] = {"upstream_ms": UPSTREAM_MS, "p99_bound_ms": CLIENT_P99_MS}
    layout = Layout(1, "reuseport", 1, ctx.layout.aiq_env, ())
    say("client: starting AIQ with 1 API process and 1 worker process")
    aiq = start_aiq(ctx.launcher, ctx.servers, ctx.sim, layout, aiq_api_env(layout, ctx.servers))
    ctx.sim.latency(UPSTREAM_MS)
    db = urllib.parse.urlparse(aiq.db_url).path.lstrip("/")
    meter = CpuMeter({"api": aiq.api, "worker": aiq.workers, "simulator": [ctx.sim.proc]}, databases=(db,))
    body = json.dumps({"query": PROMPT, "model": MODEL})
    base = {"port": aiq.api_port, "tokens": aiq.tokens, "body": body, "wait_s": 30}
    _clients(ctx, {**base, "mode": "longpoll", "rate": 10, "duration_s": 1})  # warm-up

    def settle() -> None:
        # Whichever series stepped last, the next one starts from an idle AIQ and an idle simulator.
        aiq.settle(ctx.sim)

    series = {
        "aiq_longpoll": Series(ctx, "AIQ long-poll", {**base, "mode": "longpoll"}, meter, settle),
        # The same, asked in one request: the submit waits for the answer (`Prefer: wait`).
        "aiq_wait": Series(ctx, "AIQ submit with Prefer: wait", {**base, "mode": "wait"}, meter, settle),
    }
    if _serves_events(aiq):
        series["aiq_sse"] = Series(ctx, "AIQ SSE", {**base, "mode": "sse"}, meter, settle)
    else:
        out["aiq_sse"] = {"skipped": "the API has no GET /api/v1/query/{id}/events"}
    # The same request, client and rates as LiteLLM's: AIQ's OpenAI-compatible door answers it in one request.
    series["aiq_chat"] = Series(ctx, "AIQ /v1 chat", {**base, "mode": "chat", "body": CHAT_BODY}, meter, settle)
    peer = _start_litellm(ctx, out)
    if peer is not None:
        peer_meter = CpuMeter({"litellm": [peer.proc], "simulator": [ctx.sim.proc]}, databases=("-",))
        spec = {"port": peer.port, "token": peer.key, "body": CHAT_BODY, "mode": "chat"}
        _clients(ctx, {**spec, "rate": 10, "duration_s": 1})  # warm-up
        series["litellm"] = Series(ctx, "LiteLLM", spec, peer_meter, settle)
    try:
        run_series(ctx.plan, list(series.values()))
    finally:
        if peer is not None:
            ctx.launcher.stop_group([peer.proc], timeout=10)
    for name, one in series.items():
        out[name] = {**out.get(name, {}), **one.result()}
    if ctx.profile:
        out["aiq_worker_profile"] = _profile_worker(ctx, aiq, {**base, "mode": "longpoll"}, out["aiq_longpoll"])
    ctx.launcher.stop_group([*aiq.workers, *aiq.api], timeout=10)
    out["summary"] = summary(out)
    return out


def _start_litellm(ctx: RunContext, out: dict[str, Any]) -> litellm.LiteLLM | None:
    """The peer, running beside AIQ on the same simulator; `out["litellm"]` says its version, or why there is none."""
    exe, why = litellm.ensure_venv()
    if exe is None:
        say(f"client: LiteLLM skipped: {why}")
        out["litellm"] = {"skipped": why}
        return None
    say("client: starting the LiteLLM proxy (1 worker) on the same simulator")
    try:
        peer = litellm.start(ctx.launcher, exe, ctx.sim.url, ctx.tmp)
    except (RuntimeError, TimeoutError) as exc:
        say(f"client: LiteLLM did not start: {exc}")
        out["litellm"] = {"skipped": f"did not start: {exc}"}
        return None
    out["litellm"] = {"version": litellm.version()}
    return peer


def _profile_worker(ctx: RunContext, aiq: System, spec: dict[str, Any], steps: dict[str, Any]) -> dict[str, Any]:
    """py-spy on the worker under a steady trickle of clients (half the top rate): per-message costs show here."""
    spy = profiling.py_spy()
    if spy is None:
        return {"skipped": "py-spy not installed"}
    rate = (steps.get("half_step") or {}).get("rate") or ctx.plan.client_rates[0]
    seconds = ctx.plan.client_step_s + 4
    aiq.settle(ctx.sim)
    say(f"client: py-spy on the worker for {seconds:.0f} s of clients at {rate}/s")
    started = profiling.record(spy, {"worker": aiq.workers[0].pid}, seconds, ctx.logdir, "aiq-steady")
    _clients(ctx, {**spec, "rate": rate, "duration_s": seconds})
    return {"rate": rate, "processes": profiling.collect(started, seconds)}


def _serves_events(system: System) -> bool:
    paths = http_json("GET", f"http://127.0.0.1:{system.api_port}/openapi.json").get("paths", {})
    return "/api/v1/query/{query_id}/events" in paths


def _clients(ctx: RunContext, spec: dict[str, Any]) -> dict[str, Any]:
    """Run bench/clientgen.py on one spec in its own process; its result."""
    ctx.lg.n += 1
    spec_path, out_path = ctx.tmp / f"client-{ctx.lg.n}.json", ctx.tmp / f"client-{ctx.lg.n}-out.json"
    spec_path.write_text(json.dumps({"upstream_ms": UPSTREAM_MS, "timeout_s": ctx.plan.client_timeout_s, **spec}))
    subprocess.run([PY, "-m", "bench.clientgen", str(spec_path), str(out_path)], cwd=ROOT, check=True)
    result: dict[str, Any] = json.loads(out_path.read_text())
    return result


class Series:
    """One way of asking one system, stepped through rates (`run_series`); each step's figures in `steps`."""

    def __init__(
        self, ctx: RunContext, label: str, spec: dict[str, Any], meter: CpuMeter, settle: Callable[[], object]
    ) -> None:
        self.ctx, self.label, self.spec, self.meter, self.settle = ctx, label, spec, meter, settle
        self.steps: list[dict[str, Any]] = []
        # After its first step well past the bound (P99 over 4x it, or over 1 % errors) it takes no more.
        self.stopped = False

    def step(self, rate: float, refining: bool = False) -> None:
        ctx, label = self.ctx, self.label
        self.settle()
        ctx.gate.wait()
        before = self.meter.snapshot()
        r = _clients(ctx, {**self.spec, "rate": rate, "duration_s": ctx.plan.client_step_s})
        cpu = CpuMeter.delta(before, self.meter.snapshot(), {"loadgen": r["cpu_s"]})
        answered = max(1, r["answered"])
        r["cpu_ms_per_answer"] = {k: round(1000 * v / answered, 2) for k, v in cpu["cpu_s"].items() if k != "other"}
        r["cpu"] = cpu
        r["ok"] = _ok(r)
        r["refining"] = refining
        self.steps.append(r)
        o = r["overhead_ms"]
        if not r["ok"] and ((o["p99"] or 1e9) > 4 * CLIENT_P99_MS or r["errors"] > 0.01 * r["arrivals"]):
            self.stopped = True
        say(
            f"client {label} {rate}/s{' (refining)' if refining else ''}: {r['answers_per_s']} answers/s, overhead "
            f"p50 {o['p50']} / p99 {o['p99']} ms, {r['errors']} errors, CPU-ms/answer "
            f"{_cpu_line(r['cpu_ms_per_answer'])}, machine {cpu['machine_busy_pct']}% busy"
        )
        slow = [s for s in r.get("slowest_seconds", []) if s["slow"]]
        if slow:
            # Past the bound in a few seconds only: a stall, to find in the servers' logs by its wall time.
            say(
                f"client {label} {rate}/s: slowest seconds: "
                + ", ".join(
                    f"+{s['second']} s (wall {s['wall']}): max {s['max_ms']} ms, {s['slow']}/{s['answers']} past "
                    f"{CLIENT_P99_MS:g} ms"
                    for s in slow
                )
            )
        if r.get("phases_ms"):
            say(
                f"client {label} {rate}/s: overhead by phase, p50 / p99 ms: "
                + ", ".join(f"{k} {v['p50']} / {v['p99']}" for k, v in r["phases_ms"].items())
            )

    def result(self) -> dict[str, Any]:
        return {"steps": self.steps, **_top(self.steps)}


def run_series(plan: Plan, series: list[Series]) -> None:
    """Each of the plan's rates for every series in turn, then (full plan) up to REFINE_STEPS rounds of halving the
    gap between each series' highest step within the bound and the next one above it.

    Side by side, rate by rate, the series meet the same machine: these VMs' speed drifts by a third within
    minutes, and a series measured ten minutes after another (LiteLLM after AIQ's four) read 70 in one run and 90
    in the next, moving the ratio of the two more than either system did.
    """
    for rate in plan.client_rates:
        for one in series:
            if not one.stopped:
                one.step(rate)
    for _ in range(REFINE_STEPS if plan.refine else 0):
        for one in series:
            rate = next_refinement(one.steps)
            if rate is not None:
                one.step(rate, refining=True)


def _steps(
    ctx: RunContext, label: str, spec: dict[str, Any], meter: CpuMeter, settle: Callable[[], object]
) -> dict[str, Any]:
    """One series alone (`bench.steady`)."""
    one = Series(ctx, label, spec, meter, settle)
    run_series(ctx.plan, [one])
    return one.result()


def next_refinement(steps: list[dict[str, Any]]) -> int | None:
    """The rate halfway between the highest step within the bound and the lowest one above it that was not.

    The plan's steps double at the bottom (20, 40): a system that passes 20/s and fails 40/s reads 20 whatever it
    holds in between, so a ratio of two systems' tops could be off by up to 2x. Each halving narrows that.
    """
    passed = [s["rate"] for s in steps if s["ok"]]
    if not passed:
        return None
    above = [s["rate"] for s in steps if not s["ok"] and s["rate"] > max(passed)]
    return midpoint(max(passed), min(above), REFINE_GRAIN) if above else None


def _ok(r: dict[str, Any]) -> bool:
    p99 = r["overhead_ms"]["p99"]
    return p99 is not None and p99 <= CLIENT_P99_MS and r["errors"] <= MAX_ERROR_RATE * r["arrivals"]


def _cpu_line(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v}" for k, v in cpu.items() if v >= 0.05 and k != "harness")


def _top(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The highest step within the bound, and the step nearest half its rate (where the overhead goal applies)."""
    good = [s for s in steps if s["ok"]]
    if not good:
        return {"max_answers_per_s": None, "top_step": None, "half_step": None}
    top = max(good, key=lambda s: s["answers_per_s"])
    below_half = [s for s in steps if s["rate"] <= top["rate"] / 2] or [steps[0]]
    half = max(below_half, key=lambda s: s["rate"])
    return {"max_answers_per_s": top["answers_per_s"], "top_step": _brief(top), "half_step": _brief(half)}


def _brief(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "rate": s["rate"],
        "answers_per_s": s["answers_per_s"],
        "overhead_p50_ms": s["overhead_ms"]["p50"],
        "overhead_p99_ms": s["overhead_ms"]["p99"],
        "cpu_ms_per_answer": s["cpu_ms_per_answer"],
    }


def summary(out: dict[str, Any]) -> dict[str, Any]:
    """AIQ against LiteLLM at the same P99 overhead bound."""

    def app_cpu(s: dict[str, Any] | None, roles: tuple[str, ...]) -> float | None:
        return round(sum(s["cpu_ms_per_answer"].get(r, 0.0) for r in roles), 2) if s else None

    def ratio(a: float | None, b: float | None, digits: int = 1) -> float | None:
        return round(a / b, digits) if a and b else None

    lp, peer = out.get("aiq_longpoll", {}), out.get("litellm", {})
    sse, chat, wait = out.get("aiq_sse", {}), out.get("aiq_chat", {}), out.get("aiq_wait", {})
    aiq_rate, peer_rate = lp.get("max_answers_per_s"), peer.get("max_answers_per_s")
    chat_rate, wait_rate = chat.get("max_answers_per_s"), wait.get("max_answers_per_s")
    aiq_cpu = app_cpu(lp.get("top_step"), ("api", "worker"))
    wait_cpu = app_cpu(wait.get("top_step"), ("api", "worker"))
    peer_cpu = app_cpu(peer.get("top_step"), ("litellm",))
    return {
        "aiq_answers_per_s": aiq_rate,
        "aiq_sse_answers_per_s": sse.get("max_answers_per_s"),
        "aiq_chat_answers_per_s": chat_rate,
        "aiq_wait_answers_per_s": wait_rate,
        "litellm_answers_per_s": peer_rate,
        "aiq_vs_litellm": ratio(aiq_rate, peer_rate),
        "aiq_chat_vs_litellm": ratio(chat_rate, peer_rate),
        "aiq_wait_vs_litellm": ratio(wait_rate, peer_rate),
        "aiq_half_rate_overhead_ms": _pair(lp.get("half_step")),
        "aiq_sse_half_rate_overhead_ms": _pair(sse.get("half_step")),
        "aiq_chat_half_rate_overhead_ms": _pair(chat.get("half_step")),
        "aiq_wait_half_rate_overhead_ms": _pair(wait.get("half_step")),
        "aiq_cpu_ms_per_answer_api_worker": aiq_cpu,
        "aiq_cpu_ms_per_answer_half_rate_api_worker": app_cpu(lp.get("half_step"), ("api", "worker")),
        "aiq_chat_cpu_ms_per_answer_api_worker": app_cpu(chat.get("top_step"), ("api", "worker")),
        "aiq_wait_cpu_ms_per_answer_api_worker": wait_cpu,
        "litellm_cpu_ms_per_answer": peer_cpu,
        # Each at its own top step, on the same machine in the same run: the VM's speed cancels out (the CPU per
        # answer of both scales with it, docs/benchmarks.md "the goals across five VMs").
        "aiq_cpu_vs_litellm": ratio(aiq_cpu, peer_cpu, 2),
        "aiq_wait_cpu_vs_litellm": ratio(wait_cpu, peer_cpu, 2),
    }


def _pair(s: dict[str, Any] | None) -> dict[str, Any] | None:
    return {"rate": s["rate"], "p50": s["overhead_p50_ms"], "p99": s["overhead_p99_ms"]} if s else None
