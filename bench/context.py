"""What the phases of one run share: the plan and its pacing, the processes, the simulator and the load generator."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.pacing import Clock, QuietGate
from bench.plan import Plan
from bench.stack import PY, CpuMeter, Servers
from bench.systems import Layout, Simulator
from devkit.paths import ROOT
from devkit.procs import Launcher


class Loadgen:
    """Runs bench/loadgen.py in its own process and meters every process while it runs."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.n = 0

    def _command(self, spec: dict[str, Any]) -> tuple[list[str], Path]:
        """Write the spec to a file of its own; the loadgen command line and where its result will be."""
        self.n += 1
        spec_path = self.tmp / f"spec-{self.n}.json"
        out_path = self.tmp / f"result-{self.n}.json"
        spec_path.write_text(json.dumps(spec))
        return [PY, "-m", "bench.loadgen", str(spec_path), str(out_path)], out_path

    def run(self, spec: dict[str, Any], meter: CpuMeter | None = None) -> dict[str, Any]:
        """Run one spec to the end; its result, with the CPU of every role when metered."""
        cmd, out_path = self._command(spec)
        before = meter.snapshot() if meter else None
        subprocess.run(cmd, cwd=ROOT, check=True)
        result: dict[str, Any] = json.loads(out_path.read_text())
        if meter and before:
            result["cpu"] = CpuMeter.delta(before, meter.snapshot(), {"loadgen": result["cpu_s"]})
        return result

    def start(self, spec: dict[str, Any]) -> tuple[subprocess.Popen[bytes], Path]:
        """Start one spec in the background; the process and where its result will be."""
        cmd, out_path = self._command(spec)
        return subprocess.Popen(cmd, cwd=ROOT), out_path


@dataclass(frozen=True)
class RunContext:
    """One run's shared state, made in `main` and handed to every phase and measure."""

    plan: Plan
    gate: QuietGate
    clock: Clock
    launcher: Launcher
    servers: Servers
    sim: Simulator
    lg: Loadgen
    layout: Layout
    aiq_api_env: dict[str, str]  # pool sizing and `--api-env`, computed once (it asks PostgreSQL)
    profile: bool
    tmp: Path
    logdir: Path
