"""`aiq dev --monitoring`: the Prometheus configuration it writes is valid and scrapes a real API and worker."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from devkit.devstack import prometheus_config
from devkit.paths import ROOT
from devkit.procs import free_port, spawn
from tests.support.polling import wait_for_http
from tests.support.stack import Stack

RULES = ROOT / "monitoring" / "alerts.yml"


def _needs(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"`{tool}` is not installed (`make tools` installs Debian's prometheus package)")
    return path


def test_dev_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(prometheus_config("127.0.0.1:9541", "127.0.0.1:9540", RULES))
    result = subprocess.run(
        [_needs("promtool"), "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The rule file is checked too: the dev Prometheus evaluates the same alerts as compose's.
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


def test_dev_prometheus_scrapes_the_api_and_the_worker_and_loads_the_alerts(stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    api_target = f"127.0.0.1:{stack.env['API_METRICS_PORT']}"
    worker_target = f"127.0.0.1:{stack.settings.worker_metrics_port}"
    config = tmp_path / "prometheus.yml"
    config.write_text(prometheus_config(api_target, worker_target, RULES))
    proc = spawn(
        "prometheus",
        [
            _needs("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        ],
        log=tmp_path / "prometheus.log",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/-/ready", proc=proc.popen)
        deadline = time.monotonic() + 30
        health: dict[str, str] = {}
        while time.monotonic() < deadline:
            targets = httpx.get(f"{base}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            health = {t["labels"]["job"]: t["health"] for t in targets}
            if health == {"aiq-api": "up", "aiq-worker": "up"}:
                break
            time.sleep(0.5)
        assert health == {"aiq-api": "up", "aiq-worker": "up"}, (tmp_path / "prometheus.log").read_text()
        groups = httpx.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"]
        alerts = {rule["name"] for group in groups for rule in group["rules"]}
        assert {"AIQNoWorkers", "AIQApiDown"} <= alerts, alerts
    finally:
        proc.stop(10)
