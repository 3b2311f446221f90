"""One uvicorn process on a SO_REUSEPORT socket: `python -m bench.serve APP --port N`.

Started N times on one port, the kernel spreads new connections evenly over the N processes (as
nginx's `reuseport` does). `uvicorn --workers N` shares one listening socket instead, and asyncio
accepts a burst of connections in one go, so a client's keep-alive pool can land on one process.

Everything else is uvicorn's command-line defaults (uvloop and httptools when installed, access log
on), exactly what `uvicorn APP --host 127.0.0.1 --port N` runs; like the CLI, `UVICORN_ACCESS_LOG=false`
turns the access log off. uvicorn's own `--fd` is no
substitute: it wraps the descriptor as an AF_UNIX socket, so accepted TCP connections never get
TCP_NODELAY and small responses wait for delayed ACKs (a flat ~40 ms per request).
"""

from __future__ import annotations

import argparse
import os
import socket

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    access_log = os.environ.get("UVICORN_ACCESS_LOG", "true").strip().lower() not in ("0", "false", "no", "off")
    config = uvicorn.Config(args.app, host=args.host, port=args.port, access_log=access_log)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
