"""The plan of a run: its constants, the quick and full durations, rates and sizes, and its progress line."""

from __future__ import annotations

import time
from dataclasses import dataclass

from devkit.paths import ROOT

RESULTS = ROOT / "bench" / "results"
KEEP_LOG_RUNS = 5
PROMPT = "Explain in two sentences why a queue decouples a web API from a slow upstream model."
MODEL = "gpt-4o-mini"
USERS = 8
M1_P99_MS = 50.0
M5_P99_MS = 20.0
# The client-side scenario's bound: the highest rate whose clients see at most this P99 over the upstream.
CLIENT_P99_MS = 250.0
MAX_ERROR_RATE = 0.001
# A failed step is run again once when other processes used more than this (% of one core) meanwhile.
FOREIGN_RETRY_PCT = 25.0
# A step failing with the machine less busy than this (% of all cores) is run again once as well.
SATURATED_PCT = 85.0


@dataclass(frozen=True)
class Plan:
    """Durations and sizes; `--quick` keeps the whole run to 4 to 5 minutes, the full one to about 12.

    The budget covers M1 to M5 and their optional phases; the client-side phase (with its LiteLLM peer) runs after it.
    """

    quick: bool
    step_s: float
    warmup_s: float
    p0_rates: tuple[int, ...]
    aiq_m1_rates: tuple[int, ...]
    aiq_m5_rates: tuple[int, ...]
    naive_m1_rates: tuple[int, ...]
    naive_m5_rates: tuple[int, ...]
    refine: bool
    m4_aiq: int
    m4_naive: int
    m3_count: int
    m2_s: float
    naive_m2: bool
    wrk: bool
    quiet_wait_s: float
    gate_budget_s: float
    client_rates: tuple[int, ...]
    client_step_s: float
    client_timeout_s: float
    budget_s: float  # optional phases and retries are skipped when the run would overrun this

    @classmethod
    def make(cls, quick: bool) -> Plan:
        """The quick or the full plan."""
        if quick:
            return cls(
                quick=True,
                step_s=3,
                warmup_s=1,
                p0_rates=(2000, 4000),
                aiq_m1_rates=(200, 400, 600, 800, 1000, 1500, 2000),
                aiq_m5_rates=(500, 1000, 1500, 2000, 2500, 3000, 4000),
                naive_m1_rates=(100, 200, 300, 400, 600),
                naive_m5_rates=(),
                refine=False,
                m4_aiq=1200,
                m4_naive=16,
                m3_count=1200,
                m2_s=8,
                naive_m2=False,
                wrk=False,
                quiet_wait_s=10,
                gate_budget_s=15,
                # 75: a one-worker LiteLLM tops out between 50 and 100/s on these machines; without the step the
                # quick run read its 60-75/s as 50 and the ratio high.
                client_rates=(10, 25, 50, 75, 100, 150, 200, 300),
                client_step_s=4,
                client_timeout_s=15,
                budget_s=160,
            )
        return cls(
            quick=False,
            step_s=6,
            warmup_s=1,
            p0_rates=(1000, 2000, 4000, 8000),
            aiq_m1_rates=(100, 200, 300, 400, 500, 600, 800, 1000, 1200, 1500, 2000),
            aiq_m5_rates=(250, 500, 1000, 1250, 1500, 1750, 2000, 2500, 3000, 4000),
            naive_m1_rates=(50, 100, 200, 300, 400, 600, 800),
            naive_m5_rates=(100, 200, 400, 600, 800, 1000),
            refine=True,
            m4_aiq=3000,
            m4_naive=40,
            m3_count=1200,
            m2_s=15,
            naive_m2=True,
            wrk=True,
            quiet_wait_s=30,
            gate_budget_s=45,
            client_rates=(10, 20, 40, 60, 80, 100, 125, 150, 200, 250, 300, 400),
            client_step_s=8,
            client_timeout_s=30,
            budget_s=560,
        )

    @property
    def mode(self) -> str:
        """`quick` or `full`, as the JSON and the progress lines name the run."""
        return "quick" if self.quick else "full"


def say(msg: str) -> None:
    """One progress line, time-stamped."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
