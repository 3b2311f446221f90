"""The startup heap's freeze (shared/process.py), in the API and in the worker."""

from __future__ import annotations

import gc
import subprocess
import sys

from devkit.paths import ROOT
from shared.process import freeze_startup_heap, thaw_startup_heap


def test_the_startup_heap_leaves_the_collectors_sight_until_thawed() -> None:
    kept = [[] for _ in range(1000)]
    try:
        freeze_startup_heap()
        frozen = gc.get_freeze_count()
        assert frozen >= len(kept)
    finally:
        thaw_startup_heap()
    assert gc.get_freeze_count() == 0
    assert kept


def test_a_worker_freezes_its_heap_once_ready() -> None:
    # In a process of its own: the worker's signal handlers are global to the process that imports them.
    script = (
        "import gc\n"
        "from celery.signals import worker_ready\n"
        "import worker.celery_app\n"
        "assert gc.get_freeze_count() == 0\n"
        "worker_ready.send(sender=None)\n"
        "print(gc.get_freeze_count())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert int(out.split()[-1]) > 50_000
