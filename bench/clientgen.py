"""An open-loop load generator of whole clients, run as its own process: `python -m bench.clientgen SPEC OUT`.

Where bench/loadgen.py times single requests, this one times what a client waits for: arrival *i* starts
at `t0 + i / rate` whatever happened before (open loop), and each arrival is one client that asks a
question and waits for the answer, in one of four ways:

- `longpoll` (AIQ): `POST /api/v1/query`, then `GET /api/v1/query/{id}?wait=W` until the status is final;
- `wait` (AIQ): `POST /api/v1/query` with `Prefer: wait=W`, which answers 200 with the finished query when it
  ends within W seconds (else a 202, and the client long-polls);
- `sse` (AIQ): `POST /api/v1/query`, then `GET /api/v1/query/{id}/events` read to the end of the stream;
- `chat` (a synchronous proxy such as LiteLLM, or the simulator itself): one `POST /v1/chat/completions`.

The answer time is taken from the arrival's scheduled start, so a slow load generator or a slow server
shows as overhead rather than hiding it. Overhead = answer time - upstream latency (spec `upstream_ms`).
A long-poll's (and a waiting submit's) overhead is also split where it arose (`phases_ms`, from the answer's
own timestamps, on the same machine's clock), the four adding up to it: `submit` (scheduled start to the row's
creation), `queue` (created to claimed), `run` (claimed to finished, less the upstream latency: the worker's
own steps and the call's transport), `deliver` (finished to the client holding the answer).

HTTP/1.1 on a pool of keep-alive connections (asyncio streams, uvloop when installed), grown on demand:
the load generator shares the machine with the system under test, so it reports its own CPU seconds.

SPEC (JSON): host, port, mode, rate (arrivals/s), duration_s, upstream_ms, token (Bearer, longpoll/sse)
or tokens (cycled), body (the submit or chat JSON, as a string), wait_s (long-poll wait, default 30),
timeout_s (a client gives up after this, default 60).
Result (JSON): arrivals, answered, errors by kind, answers/s, overhead percentiles (ms), CPU seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.plan import CLIENT_P99_MS

TERMINAL = {"completed", "failed", "cancelled"}
# uvicorn closes a keep-alive connection after 5 s idle; older ones are not reused.
IDLE_S = 4.0


class HttpError(Exception):
    """A response the client did not expect, named by its status (or `proto` for a malformed one)."""


class Pool:
    """Idle keep-alive connections to one host; a request takes one or opens a new one."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.opened = 0

    def _idle_conn(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The most recently used idle connection; those idle past the server's keep-alive are closed."""
        while self.idle:
            reader, writer, since = self.idle.pop()
            if time.monotonic() - since < IDLE_S:
                return reader, writer
            writer.close()
        return None

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> Any:
        """One request; (status, body bytes). A connection the server closed is retried once on a fresh one."""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if body is not None:
            head += f"Content-Length: {len(body)}\r\n"
        raw = head.encode() + b"\r\n" + (body or b"")
        for attempt in (0, 1):
            conn = self._idle_conn() if attempt == 0 else None
            fresh = conn is None
            reader, writer = conn or await self._open()
            try:
                writer.write(raw)
                status, resp_headers = await _read_head(reader)
                payload = await _read_body(reader, resp_headers)
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()
                if fresh:
                    raise
                continue  # the server closed an idle keep-alive connection: once more on a new one
            if resp_headers.get("connection", "").lower() == "close":
                writer.close()
            else:
                self.idle.append((reader, writer, time.monotonic()))
            return status, payload
        raise AssertionError("unreachable")

    async def stream(self, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        """A GET whose chunked body is read to its end (SSE); the connection goes back to the pool after it."""
        return await self.request("GET", path, headers)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.opened += 1
        return await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise HttpError("proto") from None
    headers = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    return status, headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    raise HttpError("proto")


class Run:
    """One spec: the arrivals, their outcomes and the answers' times."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.pool = Pool(spec.get("host", "127.0.0.1"), int(spec["port"]))
        self.mode = spec["mode"]
        self.tokens = spec.get("tokens") or [spec.get("token", "")]
        self.body = spec["body"].encode()
        self.wait_s = float(spec.get("wait_s", 30))
        self.timeout_s = float(spec.get("timeout_s", 60))
        # Per answered arrival: its scheduled start (s after t0), and its answer time less that start.
        self.answer_s: list[tuple[float, float]] = []
        self.done_at: list[float] = []
        self.errors: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.requests = 0
        self.max_lag_s = 0.0
        # Long-poll only: per answered arrival, the answer's row as read.
        self.final: dict[int, dict[str, Any]] = {}
        self.phases: dict[str, list[float]] = {"submit": [], "queue": [], "run": [], "deliver": []}
        self.wall_offset = time.time() - time.monotonic()
        self.t0 = time.monotonic()

    def _headers(self, i: int, json_body: bool) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.tokens[i % len(self.tokens)]}"}
        if json_body:
            h["Content-Type"] = "application/json"
        return h

    async def client(self, i: int, scheduled: float) -> None:
        """One arrival, from its question to its answer."""
        try:
            status = await asyncio.wait_for(self._ask(i), self.timeout_s)
        except TimeoutError:
            self.errors["timeout"] += 1
            return
        except HttpError as exc:
            self.errors[str(exc)] += 1
            return
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.errors[type(exc).__name__] += 1
            return
        now = time.monotonic()
        self.statuses[status] += 1
        if status == "completed":
            self.answer_s.append((scheduled - self.t0, now - scheduled))
            self.done_at.append(now)
            if i in self.final:
                self._split(scheduled, now, self.final.pop(i))
        else:
            self.errors[f"status:{status}"] += 1

    async def _ask(self, i: int) -> str:
        if self.mode == "chat":
            self.requests += 1
            code, payload = await self.pool.request("POST", "/v1/chat/completions", self._headers(i, True), self.body)
            if code != 200:
                raise HttpError(f"http:{code}")
            return "completed" if json.loads(payload).get("choices") else "failed"
        self.requests += 1
        headers = self._headers(i, True)
        if self.mode == "wait":
            headers["Prefer"] = f"wait={self.wait_s:g}"
        code, payload = await self.pool.request("POST", "/api/v1/query", headers, self.body)
        if code == 200 and self.mode == "wait":
            row = json.loads(payload)
            self.final[i] = row
            return str(row["status"])
        if code != 202:
            raise HttpError(f"submit:{code}")
        qid = json.loads(payload)["query_id"]
        if self.mode == "sse":
            self.requests += 1
            code, payload = await self.pool.stream(f"/api/v1/query/{qid}/events", self._headers(i, False))
            if code != 200:
                raise HttpError(f"events:{code}")
            return _last_sse_status(payload)
        while True:
            self.requests += 1
            code, payload = await self.pool.request(
                "GET", f"/api/v1/query/{qid}?wait={self.wait_s:g}", self._headers(i, False)
            )
            if code != 200:
                raise HttpError(f"poll:{code}")
            row = json.loads(payload)
            status = str(row["status"])
            if status in TERMINAL:
                self.final[i] = row
                return status

    def _split(self, scheduled: float, answered: float, row: dict[str, Any]) -> None:
        """Where one long-poll's overhead arose (module docstring), in ms."""
        created, started, finished = (
            datetime.fromisoformat(row[k]).timestamp() for k in ("created_at", "started_at", "finished_at")
        )
        upstream_s = float(self.spec.get("upstream_ms", 0)) / 1000
        self.phases["submit"].append(1000 * (created - scheduled - self.wall_offset))
        self.phases["queue"].append(1000 * (started - created))
        self.phases["run"].append(1000 * (finished - started - upstream_s))
        self.phases["deliver"].append(1000 * (answered + self.wall_offset - finished))

    async def main(self) -> None:
        rate, duration = float(self.spec["rate"]), float(self.spec["duration_s"])
        n = max(1, int(rate * duration))
        tasks: list[asyncio.Task[None]] = []
        self.t0 = time.monotonic() + 0.05
        for i in range(n):
            scheduled = self.t0 + i / rate
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.max_lag_s = max(self.max_lag_s, -delay)
            tasks.append(asyncio.create_task(self.client(i, scheduled)))
        self.arrivals = n
        await asyncio.gather(*tasks)
        self.pool.close()

    def result(self, cpu_s: float) -> dict[str, Any]:
        upstream_s = float(self.spec.get("upstream_ms", 0)) / 1000
        over = sorted(1000 * (a - upstream_s) for _, a in self.answer_s)
        answered = len(over)
        # The pace answers came out at: n answers are n - 1 intervals between the first and the last. A system
        # that keeps up reads the arrival rate whatever its (steady) overhead; one that falls behind, less.
        # (Counting from the instant the upstream first allows an answer read a system with 10 ms of overhead
        # below the rate: 199.75 at 200/s for 4 s.)
        span = (max(self.done_at) - min(self.done_at)) if len(self.done_at) > 1 else 0.0
        return {
            "mode": self.mode,
            "rate": self.spec["rate"],
            "duration_s": self.spec["duration_s"],
            "arrivals": self.arrivals,
            "answered": answered,
            "errors": sum(self.errors.values()),
            "errors_by_kind": dict(self.errors),
            "statuses": dict(self.statuses),
            "answers_per_s": round((len(self.done_at) - 1) / span, 1) if span > 0 else 0.0,
            "overhead_ms": _percentiles(over),
            "phases_ms": {k: _percentiles(sorted(v)) for k, v in self.phases.items() if v},
            "requests": self.requests,
            "connections_opened": self.pool.opened,
            "max_schedule_lag_ms": round(1000 * self.max_lag_s, 1),
            "slowest_seconds": self.slowest_seconds(upstream_s),
            "cpu_s": round(cpu_s, 3),
        }

    def slowest_seconds(self, upstream_s: float, n: int = 3) -> list[dict[str, Any]]:
        """The `n` seconds of arrivals with the worst overhead: when a stall hit (wall clock, to set beside the
        servers' logs), its worst overhead, and how many of that second's answers it pushed past the P99 bound."""
        worst: dict[int, list[float]] = {}
        for start, answer in self.answer_s:
            worst.setdefault(int(start), []).append(1000 * (answer - upstream_s))
        top = sorted(worst.items(), key=lambda kv: -max(kv[1]))[:n]
        return [
            {
                "second": second,
                "wall": round(self.t0 + self.wall_offset + second, 1),
                "max_ms": round(max(overs), 1),
                "slow": sum(over > CLIENT_P99_MS for over in overs),
                "answers": len(overs),
            }
            for second, overs in top
        ]


def _last_sse_status(payload: bytes) -> str:
    """The terminal status an SSE stream ended with: the type (`event:`) of its last terminal event."""
    status = "failed"
    for line in payload.decode("utf-8", "replace").splitlines():
        if line.startswith("event:") and line[6:].strip() in TERMINAL:
            status = line[6:].strip()
    return status


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}

    def pick(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))], 1)

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": round(values[-1], 1)}


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    with contextlib.suppress(ImportError):
        import uvloop  # type: ignore[import-not-found]

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    run = Run(spec)
    cpu0 = _cpu_s()
    asyncio.run(run.main())
    Path(argv[2]).write_text(json.dumps(run.result(_cpu_s() - cpu0)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
