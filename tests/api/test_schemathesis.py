"""schemathesis over every operation of /openapi.json, authenticated, against the running API: no 5xx.

It never generates deeply nested JSON (tests/api/test_edge.py covers that) and checks only
`not_a_server_error`: a 4xx for generated nonsense is the right answer. It runs as an admin, so the admin
operations are exercised too, and leaves out the two operations that end its own credentials (logout,
account deletion): after them every other operation would only see 401s.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import Engine

from tests.support.limits import make_admin
from tests.support.stack import Stack

ST = Path(sys.executable).with_name("st")
ENDS_THE_SESSION = ("POST /api/v1/auth/logout", "DELETE /api/v1/users/me")


def test_no_operation_answers_a_server_error(stack: Stack, user: dict[str, Any], db: Engine, tmp_path: Path) -> None:
    make_admin(db, user["user_id"])
    spec = httpx.get(f"{stack.api_url}/openapi.json").json()
    operations = sum(1 for item in spec["paths"].values() for method in item if method != "parameters")
    operations -= len(ENDS_THE_SESSION)
    result = subprocess.run(
        [
            str(ST),
            "run",
            f"{stack.api_url}/openapi.json",
            "--header",
            f"Authorization: {user['headers']['Authorization']}",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "50",
            "--generation-deterministic",
            "--request-timeout",
            "40",
            "--continue-on-failure",
            "--no-color",
            *(arg for name in ENDS_THE_SESSION for arg in ("--exclude-name", name)),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        cwd=tmp_path,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    # Every operation of the document was exercised, and nothing failed.
    assert f"Tested: {operations}" in out, out[-3000:]
    assert "Server error" not in out, out[-6000:]
    assert " failed" not in out.split("SUMMARY", 1)[-1], out[-3000:]
