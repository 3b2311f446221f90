"""What the API says when it starts: the development JWT key is named by the process that signs with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from devkit.paths import ROOT


def _start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Build the API app in a process of its own (importing `api.main` builds it, as uvicorn does)."""
    return subprocess.run(
        [sys.executable, "-c", "import api.main"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def _warnings(stderr: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("level") == "warning"]


def test_the_api_warns_once_of_the_development_key_and_not_with_a_real_one() -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("JWT_SECRET_KEY", "ENVIRONMENT")}
    dev = _start(base | {"ENVIRONMENT": "development"})
    said = [w for w in _warnings(dev.stderr) if "JWT_SECRET_KEY" in str(w.get("msg"))]
    assert len(said) == 1, dev.stderr
    assert "INSECURE development key" in str(said[0]["msg"])
    # Through the service's JSON log, not Python's warnings machinery (which named pydantic's file).
    assert "UserWarning" not in dev.stderr

    real = _start(base | {"ENVIRONMENT": "development", "JWT_SECRET_KEY": "k" * 48})
    assert "JWT_SECRET_KEY" not in real.stderr
