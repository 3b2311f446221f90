"""AIQ's benchmark harness: `python -m bench.run` (`make bench`) and `python -m bench.run --quick`.

Where to find what: `run` (command line and `main`), `plan` (constants, quick and full plans),
`pacing` (waiting out a busy shared machine, the time budget), `context` (what the phases share,
the load generator's driver), `systems` (simulator, AIQ, the textbook stack in `naive/`), `phases`
(each system's sequence of measures), `measures/` (P0, M1-M5, wrk, the rate search), `profiling`
(py-spy), `report` (headline figures, JSON, table), `stack` (processes, servers, CPU meter),
`loadgen` (the open-loop load generator process), `serve` (one SO_REUSEPORT API process).
"""
