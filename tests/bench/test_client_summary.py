"""The client-side scenario's summary and its rows in the printed table (pure logic; the runs are bench's)."""

from __future__ import annotations

from typing import Any

from bench.measures.client import summary
from bench.report import _client_rows


def _series(top: float, cpu: dict[str, float]) -> dict[str, Any]:
    step = {
        "rate": top,
        "answers_per_s": top,
        "overhead_p50_ms": 6.0,
        "overhead_p99_ms": 20.0,
        "cpu_ms_per_answer": cpu,
    }
    return {"max_answers_per_s": top, "top_step": step, "half_step": {**step, "rate": top / 2}}


def test_the_summary_sets_aiq_against_litellm_in_answers_and_in_cpu() -> None:
    out = {
        "aiq_longpoll": _series(120.0, {"api": 5.0, "worker": 7.0, "postgres": 2.0}),
        "aiq_wait": _series(150.0, {"api": 4.0, "worker": 6.0}),
        "litellm": _series(40.0, {"litellm": 30.0, "simulator": 1.0}),
    }
    s = summary(out)
    assert s["aiq_vs_litellm"] == 3.0
    assert s["aiq_wait_vs_litellm"] == 3.8
    assert s["aiq_chat_vs_litellm"] is None
    # API + worker only, against LiteLLM's own process: PostgreSQL and the simulator are left out of both.
    assert s["aiq_cpu_ms_per_answer_api_worker"] == 12.0
    assert s["aiq_cpu_vs_litellm"] == 0.4
    assert s["aiq_wait_cpu_vs_litellm"] == 0.33


def test_the_cpu_ratio_row_is_reported_not_judged() -> None:
    out = {
        "aiq_longpoll": _series(120.0, {"api": 5.0, "worker": 7.0}),
        "litellm": _series(40.0, {"litellm": 30.0}),
    }
    rows = _client_rows({f"client_{k}": v for k, v in summary(out).items()})
    ratio = next(r for r in rows if r[0].startswith("Client CPU per answer / LiteLLM"))
    assert ratio[3] == "0.40; -"
    assert ratio[5] is None


def test_without_a_peer_there_is_no_ratio() -> None:
    s = summary({"aiq_longpoll": _series(120.0, {"api": 5.0, "worker": 7.0})})
    assert s["aiq_vs_litellm"] is None
    assert s["aiq_cpu_vs_litellm"] is None
