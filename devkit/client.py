"""The `aiq` client commands: login, logout, password, ask, get, list, cancel, usage — a thin HTTP client of the
public API.

Exit codes (scripts may rely on them):
  0  success (`ask`: the query completed)
  1  the query failed or was cancelled, or cannot be cancelled (already finished)
  2  usage error: bad arguments, or the API refused the input (4xx other than those below)
  3  authentication: not logged in, or the token/key was refused (401/403)
  4  not found (404)
  5  server or network error (5xx, 429 after its wait, connection refused, timeout)
  130  interrupted (Ctrl-C); `ask` offers to cancel the query first

Credentials live in `<user config dir>/aiq/config.json` (platformdirs: `$XDG_CONFIG_HOME/aiq` on Linux), mode
0600. The API URL comes from `--api-url`, else `AIQ_API_URL`, else the one saved at login, else
http://127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import platformdirs
from httpx_sse import SSEError, connect_sse
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

DEFAULT_API_URL = "http://127.0.0.1:8000"
TERMINAL = ("completed", "failed", "cancelled")
# Each long-poll asks the API to hold the request this long (its maximum is 30 s).
WAIT_SLICE_SECONDS = 25

EXIT_OK, EXIT_QUERY, EXIT_USAGE, EXIT_AUTH, EXIT_NOT_FOUND, EXIT_SERVER, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class ClientError(Exception):
    """Ends the command with one line on stderr and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def config_path() -> Path:
    """Where login stores the API URL and credentials."""
    return Path(platformdirs.user_config_dir("aiq", appauthor=False)) / "config.json"


def load_config() -> dict[str, Any]:
    path = config_path()
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ClientError(f"cannot read {path}: {exc}", EXIT_USAGE) from None
    return data


def save_config(data: dict[str, Any]) -> Path:
    """Write the config file readable by its owner only (0600), atomically."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def _error_line(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['message']} ({error['code']}, HTTP {response.status_code})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code} from the API"


def _exit_code(status: int) -> int:
    if status in (401, 403):
        return EXIT_AUTH
    if status == 404:
        return EXIT_NOT_FOUND
    if status >= 500 or status == 429:
        return EXIT_SERVER
    return EXIT_USAGE


class Api:
    """The API over httpx, with the saved credentials; an expired access token is refreshed once."""

    def __init__(self, api_url: str | None, config: dict[str, Any], *, need_auth: bool = True) -> None:
        self.config = config
        self.base = (api_url or os.environ.get("AIQ_API_URL") or config.get("api_url") or DEFAULT_API_URL).rstrip("/")
        if need_auth and not (config.get("api_key") or config.get("access_token")):
            raise ClientError("not logged in: run `aiq login` first", EXIT_AUTH)
        self.http = httpx.Client(base_url=self.base, timeout=httpx.Timeout(10, read=WAIT_SLICE_SECONDS + 15))

    def _auth(self) -> dict[str, str]:
        token = self.config.get("api_key") or self.config.get("access_token")
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _refresh(self) -> bool:
        refresh = self.config.get("refresh_token")
        if not refresh or self.config.get("api_key"):
            return False
        r = self.http.post("/api/v1/auth/refresh", json={"refresh_token": refresh})
        if r.status_code != 200:
            return False
        tokens = r.json()
        self.config.update(access_token=tokens["access_token"], refresh_token=tokens["refresh_token"])
        save_config(self.config)
        return True

    def request(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs: Any) -> httpx.Response:
        """One call; a status outside `ok` ends the command with the API's own error line."""
        try:
            r = self.http.request(method, path, headers=self._auth(), **kwargs)
            if r.status_code == 401 and self._refresh():
                r = self.http.request(method, path, headers=self._auth(), **kwargs)
        except httpx.TimeoutException:
            raise ClientError(f"the API at {self.base} did not answer in time", EXIT_SERVER) from None
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the API at {self.base}: {type(exc).__name__}", EXIT_SERVER) from None
        if r.status_code not in ok:
            raise ClientError(_error_line(r), _exit_code(r.status_code))
        return r

    def stream_events(self, query_id: str, after: int) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """The query's SSE events after sequence `after`: (seq, type, data)."""
        headers = {**self._auth(), "Last-Event-ID": str(after)} if after else self._auth()
        timeout = httpx.Timeout(10, read=60)
        with connect_sse(self.http, "GET", f"/api/v1/query/{query_id}/events", headers=headers, timeout=timeout) as src:
            if src.response.status_code != 200:
                src.response.read()
                raise ClientError(_error_line(src.response), _exit_code(src.response.status_code))
            for event in src.iter_sse():
                if not event.data:
                    continue
                data = json.loads(event.data)
                yield int(event.id or data.get("seq", 0)), event.event, data

    def close(self) -> None:
        self.http.close()


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
    sys.stdout.flush()


def _query_exit(query: dict[str, Any]) -> int:
    return EXIT_OK if query["status"] == "completed" else EXIT_QUERY


def _show_query(query: dict[str, Any]) -> None:
    """A finished query for a person: the answer on stdout, anything else on stderr."""
    if query["status"] == "completed":
        sys.stdout.write((query.get("response") or "") + "\n")
        sys.stdout.flush()
        return
    error = query.get("error") or {}
    detail = f": {error.get('message')} ({error.get('code')})" if error else ""
    err.print(f"query {query['query_id']} {query['status']}{detail}", markup=False)


def _common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--api-url", help=f"API base URL (default: $AIQ_API_URL, the login's, or {DEFAULT_API_URL})")
    return parser


# Commands


def cmd_login(argv: list[str]) -> int:
    parser = _common(argparse.ArgumentParser(prog="aiq login", description="Log in and store the tokens (0600)."))
    parser.add_argument("--email", help="account email (prompted for when missing)")
    parser.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    parser.add_argument("--api-key", help="store this API key instead of logging in with a password")
    args = parser.parse_args(argv)
    config = load_config()
    api = Api(args.api_url, config, need_auth=False)
    try:
        config = {"api_url": api.base}
        if args.api_key:
            api.config = {"api_key": args.api_key}
            me = api.request("GET", "/api/v1/users/me").json()
            config["api_key"] = args.api_key
        else:
            email = args.email or input("Email: ")
            password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass("Password: ")
            tokens = api.request("POST", "/api/v1/auth/login", json={"email": email, "password": password}).json()
            config.update(access_token=tokens["access_token"], refresh_token=tokens["refresh_token"])
            api.config = config
            me = api.request("GET", "/api/v1/users/me").json()
        path = save_config(config)
    finally:
        api.close()
    err.print(f"logged in as {me['email']} at {api.base}; credentials in {path}", markup=False)
    return EXIT_OK


def cmd_logout(argv: list[str]) -> int:
    parser = _common(argparse.ArgumentParser(prog="aiq logout", description="Forget the stored credentials."))
    parser.add_argument(
        "--all",
        action="store_true",
        help="log out everywhere first: every access and refresh token of the account stops working (API keys stay)",
    )
    args = parser.parse_args(argv)
    config = load_config()
    if args.all:
        # The account's sessions end before the credentials are forgotten: a refusal keeps them, and says why.
        api = Api(args.api_url, config)
        try:
            api.request("POST", "/api/v1/auth/logout-all", ok=(204,))
        finally:
            api.close()
    elif config.get("refresh_token"):
        api = Api(args.api_url, config)
        with contextlib.suppress(ClientError):
            api.request("POST", "/api/v1/auth/logout", ok=(204,), json={"refresh_token": config["refresh_token"]})
        api.close()
    with contextlib.suppress(FileNotFoundError):
        config_path().unlink()
    err.print("logged out everywhere" if args.all else "logged out")
    return EXIT_OK


def cmd_password(argv: list[str]) -> int:
    parser = _common(
        argparse.ArgumentParser(
            prog="aiq password",
            description="Change the password. Every other session is logged out; this one gets new tokens.",
        )
    )
    parser.add_argument(
        "--password-stdin", action="store_true", help="read the current and the new password from stdin, one a line"
    )
    args = parser.parse_args(argv)
    config = load_config()
    if args.password_stdin:
        current, new = sys.stdin.readline().rstrip("\n"), sys.stdin.readline().rstrip("\n")
    else:
        current = getpass.getpass("Current password: ")
        new = getpass.getpass("New password: ")
        if getpass.getpass("New password again: ") != new:
            raise ClientError("the new passwords do not match", EXIT_USAGE)
    api = Api(args.api_url, config)
    try:
        body = {"current_password": current, "new_password": new}
        tokens = api.request("POST", "/api/v1/auth/password", json=body).json()
    finally:
        api.close()
    config.update(access_token=tokens["access_token"], refresh_token=tokens["refresh_token"])
    save_config(config)
    err.print("password changed; every other session is logged out")
    return EXIT_OK


def _interruptible(api: Api, query_id: str, body: Callable[[], int]) -> int:
    """Run `body`; on Ctrl-C ask (on a terminal) whether to cancel the query, then exit 130."""
    try:
        return body()
    except KeyboardInterrupt:
        cancel = True
        if sys.stdin.isatty():
            # A second Ctrl-C while asking leaves the query running.
            try:
                answer = input(f"\ncancel query {query_id}? [Y/n] ").strip().lower()
            except (KeyboardInterrupt, EOFError):
                answer = "n"
            cancel = answer in ("", "y", "yes")
        if cancel:
            r = api.request("POST", f"/api/v1/query/{query_id}/cancel", ok=(200, 202, 409))
            state = r.json().get("status", "finished already") if r.status_code != 409 else "finished already"
            err.print(f"query {query_id}: cancel requested ({state})", markup=False)
        else:
            err.print(f"query {query_id} keeps running: `aiq get {query_id}`", markup=False)
        return EXIT_INTERRUPTED


def _wait(api: Api, query_id: str, json_out: bool) -> int:
    status_line = err.status(f"query {query_id}: pending", spinner="dots") if err.is_terminal else None
    with status_line or contextlib.nullcontext():
        while True:
            query = api.request("GET", f"/api/v1/query/{query_id}", params={"wait": WAIT_SLICE_SECONDS}).json()
            if query["status"] in TERMINAL:
                break
            if status_line is not None:
                status_line.update(f"query {query_id}: {query['status']} (attempt {query['attempts']})")
    if json_out:
        _print_json(query)
    else:
        _show_query(query)
    return _query_exit(query)


def _stream(api: Api, query_id: str, json_out: bool) -> int:
    """Print the answer as it is written; resume from the last sequence number when the stream drops."""
    last, status, text_started, drops = 0, "pending", False, 0
    status_line = err.status(f"query {query_id}: pending", spinner="dots") if err.is_terminal else None
    if status_line is not None:
        status_line.start()
    try:
        while status not in TERMINAL:
            try:
                for seq, kind, data in api.stream_events(query_id, last):
                    last = max(last, seq)
                    if json_out:
                        sys.stdout.write(json.dumps(data) + "\n")
                        sys.stdout.flush()
                    if kind == "delta":
                        if status_line is not None:
                            status_line.stop()
                            status_line = None
                        if data.get("replayed") and text_started and not json_out:
                            # The whole stored answer, after the log was lost: it replaces what was printed.
                            sys.stdout.write("\n")
                            err.print("[the stream lost its place: the answer starts over]", markup=False)
                        if not json_out:
                            sys.stdout.write(data.get("text", ""))
                            sys.stdout.flush()
                            text_started = True
                    elif kind == "attempt_restarted" and not json_out:
                        if text_started:
                            sys.stdout.write("\n")
                        err.print(f"[attempt {data.get('attempt')} restarted: the answer starts over]", markup=False)
                    elif kind in ("queued", "started", "retry_scheduled") and status_line is not None:
                        status_line.update(f"query {query_id}: {kind} (attempt {data.get('attempt', 0)})")
                    if kind in TERMINAL:
                        status = kind
                        break
            except (httpx.TransportError, SSEError):
                drops += 1
                if drops > 5:
                    raise ClientError("the event stream kept dropping", EXIT_SERVER) from None
                time.sleep(min(2.0, 0.2 * drops))
                continue
            if status not in TERMINAL:
                # The stream ended without a terminal event: look at the row.
                query = api.request("GET", f"/api/v1/query/{query_id}").json()
                status = query["status"] if query["status"] in TERMINAL else status
    finally:
        if status_line is not None:
            status_line.stop()
    if not json_out:
        if text_started:
            sys.stdout.write("\n")
            sys.stdout.flush()
        if status != "completed":
            _show_query(api.request("GET", f"/api/v1/query/{query_id}").json())
    return EXIT_OK if status == "completed" else EXIT_QUERY


def cmd_ask(argv: list[str]) -> int:
    parser = _common(argparse.ArgumentParser(prog="aiq ask", description="Ask a question; prints the answer."))
    parser.add_argument("query", help="the question ('-' reads it from stdin)")
    parser.add_argument("--model", help="a model the server allows (default: its DEFAULT_MODEL)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--webhook-url", help="also POST the signed end event here")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--wait", action="store_true", help="wait for the whole answer (the default)")
    mode.add_argument("--stream", action="store_true", help="print the answer as it is written (SSE)")
    mode.add_argument("--no-wait", action="store_true", help="print the query id and return at once")
    parser.add_argument("--json", action="store_true", help="JSON output (with --stream: one event per line)")
    args = parser.parse_args(argv)
    text = sys.stdin.read() if args.query == "-" else args.query
    body: dict[str, Any] = {"query": text}
    for key in ("model", "system", "max_tokens", "webhook_url"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    api = Api(args.api_url, load_config())
    try:
        accepted = api.request("POST", "/api/v1/query", ok=(202,), json=body).json()
        query_id = accepted["query_id"]
        if args.no_wait:
            if args.json:
                _print_json(accepted)
            else:
                sys.stdout.write(query_id + "\n")
            return EXIT_OK
        if not args.json:
            err.print(f"query {query_id}", style="dim", markup=False)
        run = _stream if args.stream else _wait
        return _interruptible(api, query_id, lambda: run(api, query_id, args.json))
    finally:
        api.close()


def cmd_get(argv: list[str]) -> int:
    parser = _common(argparse.ArgumentParser(prog="aiq get", description="Show one of your queries."))
    parser.add_argument("query_id")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    api = Api(args.api_url, load_config())
    try:
        query = api.request("GET", f"/api/v1/query/{args.query_id}").json()
    finally:
        api.close()
    if args.json:
        _print_json(query)
        return EXIT_OK
    table = Table(show_header=False, box=None)
    usage = query.get("usage") or {}
    error = query.get("error") or {}
    for key, value in (
        ("id", query["query_id"]),
        ("status", query["status"]),
        ("model", query["model"]),
        ("attempts", query["attempts"]),
        ("created", query["created_at"]),
        ("finished", query["finished_at"]),
        ("tokens", usage.get("total_tokens")),
        ("error", f"{error.get('code')}: {error.get('message')}" if error else None),
        ("query", query["query"]),
        ("answer", query["response"]),
    ):
        if value is not None:
            table.add_row(f"[bold]{key}[/bold]", escape(str(value)))
    out.print(table)
    return EXIT_OK


def cmd_list(argv: list[str]) -> int:
    parser = _common(argparse.ArgumentParser(prog="aiq list", description="Your queries, newest first."))
    parser.add_argument("--status", choices=["pending", "running", *TERMINAL])
    parser.add_argument("--limit", type=int, default=20, help="1-100 (default 20)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    params: dict[str, Any] = {"limit": args.limit}
    if args.status:
        params["status"] = args.status
    api = Api(args.api_url, load_config())
    try:
        page = api.request("GET", "/api/v1/query", params=params).json()
    finally:
        api.close()
    if args.json:
        _print_json(page["items"])
        return EXIT_OK
    # The id is what a script or the next command needs: never wrapped or cut.
    table = Table(Column("id", no_wrap=True, min_width=36), "status", "model", "created", "query")
    for q in page["items"]:
        prompt = q["query"].replace("\n", " ")
        table.add_row(q["query_id"], q["status"], q["model"], q["created_at"][:19], escape(prompt[:40]))
    out.print(table)
    return EXIT_OK


def cmd_cancel(argv: list[str]) -> int:
    parser = _common(argparse.ArgumentParser(prog="aiq cancel", description="Cancel one of your queries."))
    parser.add_argument("query_id")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    api = Api(args.api_url, load_config())
    try:
        r = api.request("POST", f"/api/v1/query/{args.query_id}/cancel", ok=(200, 202, 409))
    finally:
        api.close()
    if r.status_code == 409:
        raise ClientError(_error_line(r), EXIT_QUERY)
    query = r.json()
    if args.json:
        _print_json(query)
    else:
        state = "cancelled" if r.status_code == 200 else "cancel requested: the worker is stopping it"
        err.print(f"query {query['query_id']}: {state}", markup=False)
    return EXIT_OK


def cmd_usage(argv: list[str]) -> int:
    parser = _common(argparse.ArgumentParser(prog="aiq usage", description="Your token usage."))
    parser.add_argument("--by", choices=["day", "model"], default="day", help="group by (default: day)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    api = Api(args.api_url, load_config())
    try:
        report = api.request("GET", "/api/v1/usage", params={"group_by": args.by}).json()
    finally:
        api.close()
    if args.json:
        _print_json(report)
        return EXIT_OK
    title = f"usage {report['from'][:10]} .. {report['to'][:10]}"
    table = Table(args.by, "queries", "prompt", "completion", "total", title=title)
    for row in [*report["items"], {**report["totals"], "key": "total"}]:
        table.add_row(
            row["key"], *(str(row[k]) for k in ("queries", "prompt_tokens", "completion_tokens", "total_tokens"))
        )
    out.print(table)
    return EXIT_OK


def run(command: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run one client command: errors become one line on stderr and the documented exit code."""
    # Ctrl-C must reach `ask` as KeyboardInterrupt even when a parent process ignored SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return command(argv)
    except ClientError as exc:
        err.print(f"aiq: error: {exc.message}", markup=False)
        return exc.code
    except SystemExit as exc:  # argparse: --help is 0, a usage error is 2
        return int(exc.code or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
