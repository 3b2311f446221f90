"""Client CPU per Redis round trip: redis-py's pure-Python RESP3 parser against hiredis, alternated in one process.

    python -m bench.micro_redis [--url redis://127.0.0.1:6379/15] [--rounds 8] [--n 4000]

Each round times, per parser, `n` iterations of what AIQ's processes send most: an EVALSHA, then a pipeline of
four commands (GET, HMGET, XADD, EXISTS); the figure is process CPU per round trip in µs. The parsers alternate
round by round, so both see the same machine. Prints JSON with each round's figures and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import redis.asyncio as aioredis
import uvloop
from redis._parsers.hiredis import _AsyncHiredisParser
from redis._parsers.resp3 import _AsyncRESP3Parser

SCRIPT = (
    "redis.call('SET', KEYS[1], ARGV[1]); redis.call('PEXPIRE', KEYS[1], 10000); "
    "return {redis.call('INCR', KEYS[2]), redis.call('TIME')}"
)
PARSERS = {"resp3_python": _AsyncRESP3Parser, "hiredis": _AsyncHiredisParser}


async def _round(url: str, parser: type, n: int) -> float:
    client = aioredis.Redis.from_url(url, parser_class=parser)
    script = client.register_script(SCRIPT)
    keys = ["aiq:micro:a", "aiq:micro:b"]
    try:
        await script(keys=keys, args=["x"])
        started = time.process_time()
        for _ in range(n):
            await script(keys=keys, args=["x"])
            async with client.pipeline(transaction=False) as pipe:
                pipe.get(keys[0])
                pipe.hmget("aiq:micro:h", "f1", "f2")
                pipe.xadd("aiq:micro:s", {"type": "delta", "data": "x" * 40}, maxlen=100)
                pipe.exists(keys[0])
                await pipe.execute()
        return (time.process_time() - started) / (2 * n) * 1e6
    finally:
        await client.delete(*keys, "aiq:micro:h", "aiq:micro:s")
        await client.aclose()


async def _main(args: argparse.Namespace) -> dict[str, object]:
    rounds: dict[str, list[float]] = {name: [] for name in PARSERS}
    for _ in range(args.rounds):
        for name, parser in PARSERS.items():
            rounds[name].append(round(await _round(args.url, parser, args.n), 1))
    return {
        "us_cpu_per_round_trip": rounds,
        "median": {name: round(statistics.median(v), 1) for name, v in rounds.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.micro_redis", description=__doc__)
    ap.add_argument("--url", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--n", type=int, default=4000)
    print(json.dumps(uvloop.run(_main(ap.parse_args())), indent=1))


if __name__ == "__main__":
    main()
