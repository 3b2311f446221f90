"""The machine speed probe every bench run records beside its figures."""

from __future__ import annotations

from bench.pacing import speed_probe
from bench.report import speed_line


def test_the_speed_probe_times_the_fixed_loop_in_fresh_interpreters() -> None:
    runs = speed_probe(repeats=2)
    assert len(runs) == 2
    # 3*10**7 additions take a Python interpreter a tenth of a second at the very least, and far less than a minute.
    assert all(0.05 < run < 60 for run in runs)


def test_the_report_gives_each_probe_its_range() -> None:
    assert speed_line({"before": [0.55, 0.5, 0.91], "after": [0.6]}) == "before 0.50-0.91, after 0.60-0.60"
    assert speed_line({"before": [0.5], "after": []}) == "before 0.50-0.50"
