"""The closed-loop cross-check of M1 with wrk, when it is installed."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from typing import Any

from bench.context import RunContext
from bench.plan import MODEL, PROMPT, say
from bench.systems import System

WRK_LUA = """
local tokens = {%s}
local body = '%s'
local i = 0
request = function()
  i = i + 1
  local h = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. tokens[(i %% #tokens) + 1]}
  return wrk.format("POST", "/api/v1/query", h, body)
end
done = function(summary, latency, requests)
  io.write(string.format("WRKJSON {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"p50_us\\": %%d, \\"p99_us\\": %%d, "
    .. "\\"errors\\": %%d, \\"non2xx\\": %%d}\\n", summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, summary.errors.status))
end
"""


def measure_wrk(ctx: RunContext, system: System, seconds: int, connections: int) -> dict[str, Any] | None:
    """Closed-loop saturation with wrk (C, cheap on CPU) as a cross-check of the Python load generator."""
    wrk = shutil.which("wrk")
    if not wrk:
        say("wrk not installed (apt-get install wrk): skipping the closed-loop cross-check")
        return None
    script = ctx.tmp / "submit.lua"
    body = json.dumps({"query": PROMPT, "model": MODEL})
    script.write_text(WRK_LUA % (", ".join(f'"{t}"' for t in system.tokens), body))
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), f"http://127.0.0.1:{system.api_port}/"],
        capture_output=True,
        text=True,
        check=False,
    )
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        say(f"wrk gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")
        return None
    d = json.loads(line.removeprefix("WRKJSON "))
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    res = {
        "connections": connections,
        "rps": round(d["requests"] / (d["duration_us"] / 1e6), 1),
        "p50_ms": d["p50_us"] / 1000,
        "p99_ms": d["p99_us"] / 1000,
        "errors": d["errors"],
        "non2xx": d["non2xx"],
        "wrk_cpu_pct_of_core": round(100 * cpu / seconds, 1),
    }
    say(f"{system.name} wrk closed loop, {connections} connections: {res}")
    return res
