"""Chaos harness: AIQ under process kills, broker and database restarts and LLM faults.

`python -m bench.chaos.run` (or `make chaos`) runs the full experiment, `--smoke` a short one; see
docs/chaos.md for what is injected, what is measured and how to read the report.
"""
