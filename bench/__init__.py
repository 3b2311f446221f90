"""AIQ's benchmark harness: `python -m bench.run` (`make bench`) and `python -m bench.run --quick`."""
