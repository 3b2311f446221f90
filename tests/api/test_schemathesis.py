"""schemathesis over every operation of /openapi.json, authenticated, against the running API: no 5xx, and every
answer as the document declares it.

It never generates deeply nested JSON (tests/api/test_edge.py covers that). A 4xx for generated nonsense is the
right answer; what is checked besides `not_a_server_error` is that the answer is one the document declares: its
status, its content type, its body's schema (each Server-Sent Event of a stream against the stream's per-event
schema) and its declared headers; that a request the document's schemas refuse is refused; and that a method a
path does not serve is a 405 whose `Allow` names the ones it does. (Not checked: that every request the schemas
allow succeeds: many are refused for what a schema cannot say, such as a blank query or a wrong password.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import Engine

from tests.support.api import register_and_login
from tests.support.limits import make_admin
from tests.support.stack import Stack

ST = Path(sys.executable).with_name("st")
_CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
        "negative_data_rejection",
        "unsupported_method",
    )
)


# They end the credential the run authenticates with (logout, here or everywhere, revokes the token, deleting the
# account ends it): in the main run every later operation would answer only 401. They get a run of their own.
_CREDENTIAL_ENDERS = "^(POST /api/v1/auth/logout|POST /api/v1/auth/logout-all|DELETE /api/v1/users/me)$"


def _st_run(stack: Stack, authorization: str, tmp_path: Path, *selection: str) -> str:
    result = subprocess.run(
        [
            str(ST),
            "run",
            f"{stack.api_url}/openapi.json",
            "--header",
            f"Authorization: {authorization}",
            "--checks",
            _CHECKS,
            "--max-examples",
            "50",
            "--generation-deterministic",
            "--request-timeout",
            "40",
            "--continue-on-failure",
            "--no-color",
            *selection,
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
    assert "Server error" not in out, out[-6000:]
    return out


def test_no_operation_answers_a_server_error(
    stack: Stack, client: httpx.Client, user: dict[str, Any], db: Engine, tmp_path: Path
) -> None:
    # An admin, so the admin operations are exercised past their 403 too.
    make_admin(db, user["user_id"])
    spec = httpx.get(f"{stack.api_url}/openapi.json").json()
    operations = sum(1 for item in spec["paths"].values() for method in item if method != "parameters")
    out = _st_run(stack, user["headers"]["Authorization"], tmp_path, "--exclude-name-regex", _CREDENTIAL_ENDERS)
    # Every other operation of the document was exercised, authenticated throughout, and nothing failed.
    assert f"Tested: {operations - 3}" in out, out[-3000:]
    assert " failed" not in out.split("SUMMARY", 1)[-1], out[-3000:]
    # The three that end the credential, with a user of their own: after the first success they answer 401,
    # which is right; what matters is that none answers a 5xx.
    ender = register_and_login(client)
    out = _st_run(stack, ender["headers"]["Authorization"], tmp_path, "--include-name-regex", _CREDENTIAL_ENDERS)
    assert "Tested: 3" in out, out[-3000:]
