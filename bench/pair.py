"""Two trees side by side under the same machine: `bench.steady` of each at once, in rounds, paired.

    python -m bench.pair BEFORE_TREE [--before-python PY] [--rounds 3] [--rate 20] [--step-s 20]
                         [--modes longpoll,wait] [--output FILE]

Run it from the "after" tree. Each round starts this tree's `bench.steady` and BEFORE_TREE's at the same time,
each on embedded PostgreSQL and Redis of its own (`TEST_*` are dropped: two stacks never share a server or a
key), with the same rate and modes; which one starts first alternates. Both runs thus see the same machine:
on a VM whose speed drifts by 20 % within minutes, runs made one after the other disagree in direction (see
docs/benchmarks.md), while a pair made at once differs only by the code. Per mode, the table gives each
round's CPU-ms per answer (API, worker) and overhead P50 / P99 for both trees, and the mean paired difference.
The machine carries both stacks: each run's `machine_busy_pct` counts the other's load too.

Its resolution, from an A/A run (the same code on both sides, 4 rounds at 20/s): paired differences of up to
0.3 ms (3 %) in CPU per answer, in one direction over all rounds of a mode (the tree it runs from read higher
more often than not, for a cause not found). Smaller effects need a measure of their own (a micro-benchmark of
the one step that changed).

`--before-python` runs the before tree with another interpreter (a virtualenv with other dependencies);
by default both use this one. BEFORE_TREE is any checkout with `bench.steady` (`git worktree add /tmp/b REV`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean
from typing import Any

from bench.pacing import NO_SPEED_PROBE_ENV, speed_probe
from bench.report import speed_report
from devkit.paths import ROOT

SIDES = ("before", "after")
# What a round reports per mode and side, from `bench.steady`'s step.
FIGURES = ("api", "worker", "p50", "p99")


def figures(step: dict[str, Any]) -> dict[str, float]:
    """One side's figures of one mode in one round."""
    cpu = step["cpu_ms_per_answer"]
    return {
        "api": cpu["api"],
        "worker": cpu["worker"],
        "p50": step["overhead_ms"]["p50"],
        "p99": step["overhead_ms"]["p99"],
        "answers_per_s": step["answers_per_s"],
        "errors": step["errors"],
    }


def summarize(rounds: list[dict[str, dict[str, Any]]], modes: list[str]) -> dict[str, Any]:
    """Per mode: each round's figures of both sides, and per figure the mean of after minus before over the rounds
    and in how many rounds after was lower (`rounds` holds each round's `bench.steady` output by side)."""
    out: dict[str, Any] = {}
    for mode in modes:
        pairs = [{side: figures(r[side][mode]["steps"][0]) for side in SIDES} for r in rounds]
        diffs = {
            key: {
                "mean_before": round(mean(p["before"][key] for p in pairs), 2),
                "mean_after": round(mean(p["after"][key] for p in pairs), 2),
                "mean_diff": round(mean(p["after"][key] - p["before"][key] for p in pairs), 2),
                "after_lower": sum(p["after"][key] < p["before"][key] for p in pairs),
            }
            for key in FIGURES
        }
        out[mode] = {"rounds": pairs, "paired": diffs}
    return out


def table(summary: dict[str, Any]) -> str:
    lines = []
    for mode, data in summary.items():
        lines.append(f"{mode}: CPU-ms per answer API / worker, overhead P50 / P99 ms (before -> after)")
        for i, p in enumerate(data["rounds"], 1):
            b, a = p["before"], p["after"]
            lines.append(
                f"  round {i}: {b['api']:.2f} / {b['worker']:.2f}, {b['p50']:.1f} / {b['p99']:.1f}"
                f"  ->  {a['api']:.2f} / {a['worker']:.2f}, {a['p50']:.1f} / {a['p99']:.1f}"
                + (f"  (errors {b['errors']} / {a['errors']})" if b["errors"] or a["errors"] else "")
            )
        n = len(data["rounds"])
        for key, d in data["paired"].items():
            lines.append(
                f"  {key:>6}: {d['mean_before']} -> {d['mean_after']} (mean paired difference {d['mean_diff']:+}, "
                f"after lower in {d['after_lower']} of {n})"
            )
    return "\n".join(lines)


def _steady(python: str, tree: Path, args: argparse.Namespace, output: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("TEST_DATABASE_URL", "TEST_REDIS_URL", "TEST_AMQP_URL")}
    # The two runs start together and share the machine: this run probes its speed, before and after them.
    env[NO_SPEED_PROBE_ENV] = "1"
    argv = [python, "-m", "bench.steady", "--rate", str(args.rate), "--step-s", str(args.step_s)]
    argv += ["--modes", args.modes, "--output", str(output)]
    with output.with_suffix(".log").open("wb") as log:
        # The child holds its own copy of the descriptor.
        return subprocess.Popen(argv, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.pair", description=__doc__)
    ap.add_argument("before", type=Path, help="the other tree (a checkout with bench.steady)")
    ap.add_argument("--before-python", default=sys.executable, help="its interpreter (default: this one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=int, default=20, help="client arrivals per second, per tree (default 20)")
    ap.add_argument("--step-s", type=float, default=20.0)
    ap.add_argument("--modes", default="longpoll,wait")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    trees = {"before": (args.before_python, args.before.resolve()), "after": (sys.executable, ROOT)}
    work = Path(tempfile.mkdtemp(prefix="aiq-pair-", dir="/tmp"))
    rounds: list[dict[str, dict[str, Any]]] = []
    probe = {"before": speed_probe()}
    for i in range(args.rounds):
        order = SIDES if i % 2 == 0 else SIDES[::-1]
        runs = {side: _steady(*trees[side], args, work / f"{side}-{i}.json") for side in order}
        for side, proc in runs.items():
            if proc.wait() != 0:
                sys.exit(f"round {i + 1}: the {side} tree's bench.steady failed: {work / f'{side}-{i}.log'}")
        rounds.append({side: json.loads((work / f"{side}-{i}.json").read_text()) for side in SIDES})
        print(f"round {i + 1} of {args.rounds} done", file=sys.stderr)
    probe["after"] = speed_probe()
    summary = summarize(rounds, args.modes.split(","))
    print(table(summary))
    print(speed_report(probe))
    if args.output:
        result = {"before": str(trees["before"][1]), "after": str(ROOT), "rate": args.rate, "step_s": args.step_s}
        args.output.write_text(json.dumps({**result, "speed_probe_s": probe, "modes": summary}, indent=1))


if __name__ == "__main__":
    main()
