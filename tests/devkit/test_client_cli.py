"""The `aiq` client commands, run as real subprocesses against the test stack."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy.engine import Engine

from devkit.procs import free_port
from tests.support.api import TEST_PASSWORD, register_and_login
from tests.support.db import insert_query, row
from tests.support.polling import wait_until
from tests.support.stack import Stack


def _env(stack: Stack, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIQ_")}
    return {**env, "XDG_CONFIG_HOME": str(home / "config"), "AIQ_API_URL": stack.api_url, "NO_COLOR": "1"}


def aiq(
    stack: Stack, home: Path, *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devkit.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=_env(stack, home),
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def logged_in(client: httpx.Client, stack: Stack, tmp_path: Path) -> dict[str, Any]:
    user = register_and_login(client)
    r = aiq(stack, tmp_path, "login", "--email", user["email"], "--password-stdin", stdin=TEST_PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    return {**user, "home": tmp_path}


def test_login_stores_tokens_in_a_0600_file_in_the_config_dir(logged_in: dict[str, Any], stack: Stack) -> None:
    path = logged_in["home"] / "config" / "aiq" / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = json.loads(path.read_text())
    assert config["api_url"] == stack.api_url
    assert config["access_token"]
    assert config["refresh_token"]


def test_ask_waits_and_prints_the_answer(logged_in: dict[str, Any], stack: Stack) -> None:
    r = aiq(stack, logged_in["home"], "ask", "What is a queue?", "--system", "Be brief", "--model", "sim-large")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "query " in r.stderr


def test_ask_json_is_the_finished_query(logged_in: dict[str, Any], stack: Stack) -> None:
    r = aiq(stack, logged_in["home"], "ask", "json please", "--json")
    assert r.returncode == 0, r.stderr
    query = json.loads(r.stdout)
    assert query["status"] == "completed"
    assert query["response"]
    r = aiq(stack, logged_in["home"], "get", query["query_id"], "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["query_id"] == query["query_id"]
    r = aiq(stack, logged_in["home"], "get", query["query_id"])
    assert r.returncode == 0
    assert "completed" in r.stdout
    r = aiq(stack, logged_in["home"], "list", "--status", "completed", "--json")
    assert r.returncode == 0
    assert query["query_id"] in [q["query_id"] for q in json.loads(r.stdout)]
    r = aiq(stack, logged_in["home"], "list")
    assert r.returncode == 0
    assert query["query_id"] in r.stdout


def test_a_failed_query_exits_1_with_its_error(logged_in: dict[str, Any], stack: Stack) -> None:
    r = aiq(stack, logged_in["home"], "ask", f"[[sim fail=400]] bad {uuid.uuid4()}")
    assert r.returncode == 1, r.stderr
    assert "failed" in r.stderr
    assert r.stdout == ""


def test_exit_codes_for_not_found_usage_auth_and_network(logged_in: dict[str, Any], stack: Stack) -> None:
    home = logged_in["home"]
    r = aiq(stack, home, "get", str(uuid.uuid4()))
    assert r.returncode == 4
    assert r.stderr.strip().count("\n") == 0
    assert "query_not_found" in r.stderr
    assert aiq(stack, home, "get", "not-a-uuid").returncode == 2
    assert aiq(stack, home, "ask").returncode == 2
    assert aiq(stack, home, "ask", "x", "--model", "no-such-model").returncode == 2
    assert aiq(stack, home, "list", "--api-url", f"http://127.0.0.1:{free_port()}").returncode == 5
    assert aiq(stack, home / "elsewhere", "list").returncode == 3
    r = aiq(stack, home / "elsewhere", "login", "--api-key", "aiq_bogus")
    assert r.returncode == 3
    r = aiq(stack, home / "elsewhere", "login", "--email", "nobody@example.com", "--password-stdin", stdin="wrong\n")
    assert r.returncode == 3
    assert aiq(stack, home, "nonsense").returncode == 2


def test_cancel_and_usage(logged_in: dict[str, Any], stack: Stack, db: Engine) -> None:
    home = logged_in["home"]
    parked = insert_query(db, logged_in["user_id"], next_attempt_at="now() + interval '1 hour'")
    r = aiq(stack, home, "cancel", parked)
    assert r.returncode == 0, r.stderr
    assert row(db, parked)["status"] == "cancelled"
    r = aiq(stack, home, "cancel", parked)
    assert r.returncode == 1
    assert "query_not_cancellable" in r.stderr
    r = aiq(stack, home, "usage", "--json")
    assert r.returncode == 0, r.stderr
    assert "totals" in json.loads(r.stdout)
    assert aiq(stack, home, "usage", "--by", "model").returncode == 0


def test_api_key_login(client: httpx.Client, stack: Stack, tmp_path: Path) -> None:
    user = register_and_login(client)
    key = client.post("/api/v1/keys", json={"name": "cli"}, headers=user["headers"]).json()["key"]
    r = aiq(stack, tmp_path, "login", "--api-key", key)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "config" / "aiq" / "config.json").read_text())["api_key"] == key
    r = aiq(stack, tmp_path, "ask", "with a key", "--no-wait")
    assert r.returncode == 0, r.stderr
    uuid.UUID(r.stdout.strip())


def test_ctrl_c_cancels_the_query(logged_in: dict[str, Any], stack: Stack, db: Engine) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "devkit.cli", "ask", f"[[sim latency_ms=20000]] slow {uuid.uuid4()}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(stack, logged_in["home"]),
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        query_id = line.split()[1]
        wait_until(lambda: row(db, query_id)["status"] == "running", timeout=20)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, rest
    assert "cancel requested" in rest
    wait_until(lambda: row(db, query_id)["status"] == "cancelled", timeout=20)


def test_ask_stream_prints_the_answer_as_it_is_written(logged_in: dict[str, Any], stack: Stack) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devkit.cli",
            "ask",
            f"[[sim tokens=30 chunk_ms=100]] stream {uuid.uuid4()}",
            "--stream",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(stack, logged_in["home"]),
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.read(1)
        first_at = time.monotonic()
        rest = proc.stdout.read()
        proc.wait(timeout=60)
        ended_at = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    # 30 chunks 0.1 s apart: the first words are on the terminal long before the last.
    assert ended_at - first_at > 1.0
    assert proc.stderr is not None
    query_id = proc.stderr.read().decode().split()[1]
    stored = json.loads(aiq(stack, logged_in["home"], "get", query_id, "--json").stdout)
    assert (first + rest).decode() == stored["response"] + "\n"


def test_ask_stream_starts_over_on_its_own_line_when_the_log_is_replayed(
    logged_in: dict[str, Any], stack: Stack
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "devkit.cli", "ask", f"[[sim tokens=60 chunk_ms=100]] lost {uuid.uuid4()}", "--stream"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(stack, logged_in["home"]),
    )
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        first = proc.stdout.read(1)
        # The log is lost mid-answer (a Redis restart): the stream ends with the stored answer, flagged replayed.
        listed = httpx.get(f"{stack.api_url}/api/v1/query", headers=logged_in["headers"], params={"limit": 1})
        query_id = listed.json()["items"][0]["query_id"]
        r = redis.Redis.from_url(stack.settings.redis_url)
        prefix = f"aiq:{stack.settings.queue_name}:ev:{query_id}"
        assert r.delete(prefix, f"{prefix}:seq") >= 1
        rest = proc.stdout.read()
        proc.wait(timeout=60)
        stderr = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    stored = json.loads(aiq(stack, logged_in["home"], "get", query_id, "--json").stdout)
    out = (first + rest).decode()
    # What was printed stays; the whole answer follows on a line of its own, not glued to the partial text.
    assert out.split("\n")[-2] == stored["response"]
    assert "starts over" in stderr


def test_ask_stream_json_is_one_event_per_line(logged_in: dict[str, Any], stack: Stack) -> None:
    r = aiq(
        stack, logged_in["home"], "ask", f"[[sim tokens=12 chunk_ms=20]] events {uuid.uuid4()}", "--stream", "--json"
    )
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))
    assert events[-1]["type"] == "completed"
    assert "started" in {e["type"] for e in events}
    text = "".join(e["text"] for e in events if e["type"] == "delta")
    query_id = json.loads(aiq(stack, logged_in["home"], "list", "--json", "--limit", "1").stdout)[0]["query_id"]
    stored = json.loads(aiq(stack, logged_in["home"], "get", query_id, "--json").stdout)
    assert text == stored["response"]


def test_ask_stream_of_a_failing_query_exits_1(logged_in: dict[str, Any], stack: Stack) -> None:
    r = aiq(stack, logged_in["home"], "ask", f"[[sim fail=400]] no {uuid.uuid4()}", "--stream")
    assert r.returncode == 1, r.stderr
    assert "failed" in r.stderr


def test_password_change_keeps_this_login_and_logout_all_ends_every_session(
    logged_in: dict[str, Any], stack: Stack, client: httpx.Client, tmp_path: Path
) -> None:
    home = logged_in["home"]
    # Another session of the same account, on another machine: a second login.
    other = client.post("/api/v1/auth/login", json={"email": logged_in["email"], "password": TEST_PASSWORD}).json()
    other_headers = {"Authorization": f"Bearer {other['access_token']}"}
    assert client.get("/api/v1/users/me", headers=other_headers).status_code == 200

    wrong = aiq(stack, home, "password", "--password-stdin", stdin="not the password\nanother long passphrase\n")
    assert wrong.returncode == 2, wrong.stderr
    assert "invalid_current_password" in wrong.stderr

    new_password = f"a brand new passphrase {uuid.uuid4().hex[:6]}"
    r = aiq(stack, home, "password", "--password-stdin", stdin=f"{TEST_PASSWORD}\n{new_password}\n")
    assert r.returncode == 0, r.stderr
    # This login goes on with the new pair it saved; the other session is over, and the old password too.
    assert aiq(stack, home, "list", "--json").returncode == 0
    assert client.get("/api/v1/users/me", headers=other_headers).status_code == 401
    old = client.post("/api/v1/auth/login", json={"email": logged_in["email"], "password": TEST_PASSWORD})
    assert old.status_code == 401

    # Log out everywhere from a second machine: the first one's saved tokens stop working too.
    second = tmp_path / "second"
    r = aiq(stack, second, "login", "--email", logged_in["email"], "--password-stdin", stdin=new_password + "\n")
    assert r.returncode == 0, r.stderr
    r = aiq(stack, second, "logout", "--all")
    assert r.returncode == 0, r.stderr
    assert "everywhere" in r.stderr
    assert not (second / "config" / "aiq" / "config.json").exists()
    refused = aiq(stack, home, "list")
    assert refused.returncode == 3, refused.stderr
