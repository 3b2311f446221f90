"""OpenAI-compatible LLM simulator with configurable latency and injected faults (`aiq simulate`)."""

from __future__ import annotations

import logging

from devkit.simulator.app import SimulatorApp, SimulatorStats, create_app
from devkit.simulator.config import (
    ConfigError,
    SimulatorConfig,
    build_parser,
    config_from_args,
)
from devkit.simulator.server import RunningSimulator, run_in_thread, serve

__all__ = [
    "ConfigError",
    "RunningSimulator",
    "SimulatorApp",
    "SimulatorConfig",
    "SimulatorStats",
    "create_app",
    "main",
    "run_in_thread",
    "serve",
]


def main(argv: list[str] | None = None) -> int:
    """Entry point of `aiq simulate` and `python -m devkit.simulator`; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        config = config_from_args(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    except ConfigError as exc:
        parser.print_usage()
        print(f"aiq simulate: error: {exc}")
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return serve(config)
