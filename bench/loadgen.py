"""An open-loop HTTP/1.1 load generator, run as its own process: `python -m bench.loadgen SPEC.json`.

Why not wrk: wrk is closed-loop (a slow server slows the client down, so its latencies hide queueing —
"coordinated omission"), and wrk2 is not packaged here. This client schedules request *i* at
`t0 + i / rate` whatever happened before, and measures each latency from that intended start, the way
wrk2 does. Requests that find no idle keep-alive connection open a new one (up to `max_connections`)
or wait in a backlog, and the wait counts as latency.

It speaks just enough HTTP/1.1 over raw asyncio protocols (uvloop when installed) to stay cheap: the
load generator shares this 2-core machine with the system under test, so it reports its own CPU time.

SPEC (JSON): host, port, requests: [{method, path, headers: {..}, body: str|null}] (cycled), rate (req/s;
0 = all at once, bounded by max_connections), count or duration_s, warmup_s, connections (opened before
the start and reused round-robin, default 32), max_connections (more are opened when all are busy),
timeout_s,
collect: a JSON key whose value is kept from each 2xx response body (e.g. "query_id").
Result (JSON on stdout): counts, statuses, achieved rate, latency percentiles (ms), CPU seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

_CRLF2 = b"\r\n\r\n"


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "p999": None, "max": None, "mean": None}
    s = sorted(values)
    n = len(s)

    def pick(q: float) -> float:
        return round(s[min(n - 1, int(q * n))] * 1000, 3)

    return {
        "p50": pick(0.50),
        "p90": pick(0.90),
        "p99": pick(0.99),
        "p999": pick(0.999),
        "max": round(s[-1] * 1000, 3),
        "mean": round(sum(s) / n * 1000, 3),
    }


def build_request(host: str, port: int, method: str, path: str, headers: dict[str, str], body: str | None) -> bytes:
    """One pre-encoded HTTP/1.1 keep-alive request."""
    payload = body.encode() if body is not None else b""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        lines.append(f"Content-Length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


class _Conn(asyncio.Protocol):
    """One keep-alive connection; at most one request outstanding (no pipelining)."""

    __slots__ = ("buf", "close_after", "expect", "gen", "head_len", "req", "sent_at", "status", "transport")

    def __init__(self, gen: LoadGen) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.req: tuple[int, float] | None = None  # (index, scheduled time)
        self.sent_at = 0.0
        self.head_len = -1
        self.expect = -1
        self.status = 0
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, index: int, scheduled: float) -> None:
        self.req = (index, scheduled)
        self.head_len = -1
        self.sent_at = self.gen.now()
        assert self.transport is not None
        self.transport.write(self.gen.payloads[index % self.gen.n_payloads])

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.head_len < 0:
            end = buf.find(_CRLF2)
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            self.head_len = end + 4
            self.status = int(head[9:12])
            self.close_after = b"\r\nconnection: close" in head
            cl = head.find(b"\r\ncontent-length:")
            if cl >= 0:
                stop = head.find(b"\r\n", cl + 2)
                self.expect = int(head[cl + 17 : stop if stop >= 0 else len(head)].strip())
            elif b"\r\ntransfer-encoding: chunked" in head:
                self.expect = -2
            else:
                self.expect = 0
        if self.expect == -2:
            body = self._dechunk()
            if body is None:
                return
        else:
            if len(buf) - self.head_len < self.expect:
                return
            body = bytes(buf[self.head_len : self.head_len + self.expect])
            del buf[: self.head_len + self.expect]
        req = self.req
        self.req = None
        self.head_len = -1
        if req is not None:
            self.gen.on_response(self, req, self.status, body)
        if self.close_after and self.transport is not None:
            self.transport.close()

    def _dechunk(self) -> bytes | None:
        pos = self.head_len
        out = bytearray()
        buf = self.buf
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            if len(buf) < eol + 2 + size + 2:
                return None
            out += buf[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2
            if size == 0:
                del buf[:pos]
                return bytes(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.on_lost(self)


class LoadGen:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.host: str = spec.get("host", "127.0.0.1")
        self.port: int = int(spec["port"])
        self.payloads = [
            build_request(self.host, self.port, r.get("method", "GET"), r["path"], r.get("headers", {}), r.get("body"))
            for r in spec["requests"]
        ]
        self.n_payloads = len(self.payloads)
        self.rate = float(spec.get("rate", 0))
        if "count" in spec:
            self.total = int(spec["count"])
        else:
            self.total = max(1, int(float(spec["duration_s"]) * self.rate))
        self.warmup = float(spec.get("warmup_s", 0))
        self.max_conns = int(spec.get("max_connections", 256))
        self.timeout = float(spec.get("timeout_s", 10))
        self.collect: str | None = spec.get("collect")
        # FIFO reuse spreads requests over every open connection (and so over every API process),
        # like many independent clients would; LIFO would pile them onto the one hottest connection.
        self.idle: deque[_Conn] = deque()
        self.preopen = min(int(spec.get("connections", 32)), self.max_conns)
        self.conns: set[_Conn] = set()
        self.connecting = 0
        self.backlog: deque[tuple[int, float]] = deque()
        self.max_backlog = 0
        self.max_open = 0
        self.done = 0
        self.ok_measured = 0
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.statuses: dict[int, int] = {}
        self.lat: list[float] = []  # from the scheduled start, measured window only
        self.svc: list[float] = []  # from the actual send, measured window only
        self.done_at: list[float] = []
        self.last_done = 0.0
        self.collected: list[Any] = []
        self.measure_from = 0.0
        self.finished: asyncio.Future[None] | None = None
        self.loop = asyncio.get_event_loop()
        # Not loop.time(): uvloop's clock has millisecond resolution.
        self.now = time.perf_counter

    # -- connections ---------------------------------------------------------------------------
    def _dispatch(self, index: int, scheduled: float) -> None:
        if self.idle:
            self.idle.popleft().send(index, scheduled)
        elif len(self.conns) + self.connecting < self.max_conns:
            self.connecting += 1
            self.loop.create_task(self._open(index, scheduled))
        else:
            self.backlog.append((index, scheduled))
            if len(self.backlog) > self.max_backlog:
                self.max_backlog = len(self.backlog)

    async def _preopen(self) -> None:
        async def one() -> None:
            try:
                _, conn = await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
            except OSError:
                return
            self.conns.add(conn)
            self.idle.append(conn)

        await asyncio.gather(*(one() for _ in range(self.preopen)))
        self.max_open = len(self.conns)

    async def _open(self, index: int, scheduled: float) -> None:
        try:
            _, conn = await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except OSError as exc:
            self.connecting -= 1
            self._fail(type(exc).__name__)
            return
        self.connecting -= 1
        self.conns.add(conn)
        self.max_open = max(self.max_open, len(self.conns))
        conn.send(index, scheduled)

    def _next(self, conn: _Conn) -> None:
        if self.backlog:
            index, scheduled = self.backlog.popleft()
            conn.send(index, scheduled)
        else:
            self.idle.append(conn)

    def on_response(self, conn: _Conn, req: tuple[int, float], status: int, body: bytes) -> None:
        t = self.now()
        _, scheduled = req
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if scheduled >= self.measure_from:
            if 200 <= status < 300:
                self.ok_measured += 1
            self.lat.append(t - scheduled)
            self.svc.append(t - conn.sent_at)
            self.done_at.append(t)
            self.last_done = t
        if self.collect and 200 <= status < 300:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.collected.append(json.loads(body)[self.collect])
        self._count_done()
        if not conn.close_after:
            self._next(conn)

    def on_lost(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.req is not None:
            conn.req = None
            self._fail("connection_lost")
        if self.backlog and len(self.conns) + self.connecting < self.max_conns:
            index, scheduled = self.backlog.popleft()
            self.connecting += 1
            self.loop.create_task(self._open(index, scheduled))

    def _fail(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        self._count_done()

    def _count_done(self) -> None:
        self.done += 1
        if self.done >= self.total and self.finished is not None and not self.finished.done():
            self.finished.set_result(None)

    # -- the schedule --------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        self.finished = self.loop.create_future()
        await self._preopen()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        wall0 = time.time()
        t0 = self.now() + 0.02
        self.measure_from = t0 + self.warmup
        sent = 0
        if self.rate <= 0:
            self.measure_from = t0
            for i in range(self.total):
                self._dispatch(i, t0)
            sent = self.total
        else:
            interval = 1.0 / self.rate
            while sent < self.total:
                now = self.now()
                due = min(self.total, int((now - t0) * self.rate) + 1) if now >= t0 else 0
                while sent < due:
                    self._dispatch(sent, t0 + sent * interval)
                    sent += 1
                if sent < self.total:
                    wait = t0 + sent * interval - self.now()
                    # Timers below 1 ms would spin the loop; a 1 ms batch is well inside any latency we judge.
                    await asyncio.sleep(max(0.001, wait))
        schedule_end = self.now()
        try:
            await asyncio.wait_for(asyncio.shield(self.finished), self.timeout)
        except TimeoutError:
            pending = self.total - self.done
            self.errors += pending
            self.error_kinds["timeout"] = self.error_kinds.get("timeout", 0) + pending
        end = self.now()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.close()
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        measured = len(self.lat)
        window = (self.last_done - self.measure_from) if self.rate > 0 else (self.last_done - t0)
        ok = sum(n for s, n in self.statuses.items() if 200 <= s < 300)
        return {
            "offered_rps": self.rate if self.rate > 0 else None,
            "total": self.total,
            "completed": self.done - self.errors,
            "ok": ok,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "measured": measured,
            "achieved_rps": round(self.ok_measured / window, 1) if window > 0 and measured else 0.0,
            "latency_ms": _percentiles(self.lat),
            "service_ms": _percentiles(self.svc),
            "schedule_s": round(schedule_end - t0, 3),
            "elapsed_s": round(end - t0, 3),
            "wall_start": wall0,
            "max_connections_open": self.max_open,
            "max_backlog": self.max_backlog,
            "cpu_s": round(cpu, 3),
            "cpu_pct_of_core": round(100 * cpu / max(1e-9, end - t0), 1),
            "timeline": self._timeline(t0),
            "collected": self.collected,
        }

    def _timeline(self, t0: float, bucket: float = 0.25) -> list[list[float]]:
        """[seconds since start, responses, worst latency in ms] per quarter second: where the stalls were."""
        buckets: dict[int, list[float]] = {}
        for done, lat in zip(self.done_at, self.lat, strict=True):
            b = buckets.setdefault(int((done - t0) / bucket), [0, 0.0])
            b[0] += 1
            b[1] = max(b[1], lat)
        return [[round(k * bucket, 2), v[0], round(v[1] * 1000, 1)] for k, v in sorted(buckets.items())]


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text() if argv and argv[0] != "-" else sys.stdin.read())
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - plain asyncio works, just costs more CPU
        pass
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))

    async def go() -> dict[str, Any]:
        return await LoadGen(spec).run()

    result = asyncio.run(go())
    out = json.dumps(result)
    if len(argv) > 1:
        Path(argv[1]).write_text(out)
    else:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
