"""The LiteLLM proxy as a peer: a synchronous OpenAI-compatible pass-through to the same simulator.

It lives in a bench-only virtualenv (`.bench-venv/`, `pip install 'litellm[proxy]'`), created on first use
when the package index is reachable; without it the peer is skipped with a note. One worker process,
`LITELLM_MASTER_KEY` set (the proxy refuses to start without one), no database: a plain pass-through.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.plan import MODEL, say
from bench.stack import SIM_API_KEY, new_secret, wait_http
from devkit.paths import ROOT
from devkit.procs import Launcher, Proc, free_port

VENV = ROOT / ".bench-venv"
PACKAGE = "litellm[proxy]"


def ensure_venv() -> tuple[Path | None, str]:
    """The `litellm` executable of the bench-only venv, installing it when missing; else None and why."""
    exe = VENV / "bin" / "litellm"
    if exe.exists():
        return exe, "installed"
    say(f"LiteLLM: creating {VENV.name}/ and installing {PACKAGE} (bench-only, once)")
    try:
        if not (VENV / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=120)
        subprocess.run(
            [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "--timeout", "30", PACKAGE],
            check=True,
            timeout=900,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        return None, f"could not install {PACKAGE} into {VENV.name}/ ({type(exc).__name__}): registry unreachable?"
    return (exe, "installed now") if exe.exists() else (None, f"{PACKAGE} installed no `litellm` command")


@dataclass
class LiteLLM:
    """A running proxy: its port, process and master key."""

    port: int
    proc: Proc
    key: str


def start(launcher: Launcher, exe: Path, sim_url: str, tmp: Path) -> LiteLLM:
    """The proxy with one worker, its one model routed to the simulator."""
    cfg = tmp / "litellm.yaml"
    cfg.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {sim_url}/v1\n"
        f"      api_key: {SIM_API_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    key = f"sk-{new_secret()}"
    port = free_port()
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": key,
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
        "PYTHONUNBUFFERED": "1",
    }
    for var in ("DATABASE_URL", "REDIS_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        env.pop(var, None)
    cmd = [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    proc = launcher.start("litellm", cmd, env)
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc, timeout=180)
    return LiteLLM(port, proc, key)


def version() -> str | None:
    """The installed LiteLLM release, as the report names the peer."""
    out = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or None
