"""Webhook delivery lag: from a query's end (its row's `finished_at`) to the moment a local HTTPS receiver
has the signed POST. The receiver runs in this process with a self-signed certificate for 127.0.0.1, which
AIQ's processes trust through `SSL_CERT_FILE` (and reach through `WEBHOOK_ALLOWED_HOSTS`): the bench stack
runs with ENVIRONMENT=production, so the URL must be https, and TLS is part of the measured cost.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import tempfile
import threading
import time
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.context import RunContext
from bench.measures.m2 import percentile
from bench.plan import say
from bench.stack import pg
from bench.systems import System


@lru_cache(maxsize=1)
def receiver_certificate() -> tuple[str, str]:
    """A self-signed certificate and key for 127.0.0.1, made once per run (AIQ's env names the certificate)."""
    directory = Path(tempfile.mkdtemp(prefix="aiq-bench-hook-"))
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def receiver_env() -> dict[str, str]:
    """What AIQ's processes need to deliver to the bench's receiver."""
    return {"WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "SSL_CERT_FILE": receiver_certificate()[0]}


class _Receiver:
    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        lock = threading.Lock()
        arrivals = self.arrivals

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                now = time.time()
                with lock:
                    arrivals.setdefault(json.loads(body)["data"]["query_id"], now)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        cert, key = receiver_certificate()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def measure_webhook_lag(ctx: RunContext, system: System, rate: float, duration: float) -> dict[str, Any]:
    """Submits with a `webhook_url` at `rate`/s; lag = receiver's arrival time - the row's `finished_at`."""
    receiver = _Receiver()
    try:
        system.settle(ctx.sim)
        ctx.gate.wait()
        say(f"{system.name} webhook lag: {rate:.0f}/s for {duration:.0f} s, each with a webhook to a local receiver")
        spec = system.submit_spec(rate, duration=duration, warmup_s=0)
        for request in spec["requests"]:
            request["body"] = json.dumps({**json.loads(request["body"]), "webhook_url": receiver.url})
        r = ctx.lg.run(spec)
        ids = list(r["collected"])
        system.wait_terminal(ids, 60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(receiver.arrivals) < len(ids):
            time.sleep(0.2)
        with contextlib.closing(pg(system.db_url)) as conn, conn.cursor() as cur:
            cur.execute("SELECT id::text, finished_at FROM queries WHERE id = ANY(%s::uuid[])", (ids,))
            finished = {qid: at.timestamp() for qid, at in cur.fetchall() if at is not None}
    finally:
        receiver.close()
    lags = [1000 * (receiver.arrivals[q] - finished[q]) for q in finished if q in receiver.arrivals]
    summary = {
        "rate": rate,
        "submitted": len(ids),
        "delivered": len(lags),
        "p50_ms": _round(percentile(lags, 0.5)),
        "p90_ms": _round(percentile(lags, 0.9)),
        "p99_ms": _round(percentile(lags, 0.99)),
        "max_ms": _round(max(lags) if lags else None),
    }
    say(
        f"{system.name} webhook lag: p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms "
        f"({summary['delivered']}/{summary['submitted']} delivered)"
    )
    return summary


def _round(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None
