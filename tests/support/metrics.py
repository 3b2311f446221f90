"""Multiprocess-mode helpers that only the metrics tests need."""

from __future__ import annotations

import glob
import os

from prometheus_client import multiprocess

from shared.metrics import MULTIPROC_DIR


def reset_multiproc_dir() -> None:
    """Delete value files left by earlier processes; files of the calling process are kept."""
    if not MULTIPROC_DIR:
        return
    own = f"_{os.getpid()}.db"
    for path in glob.glob(os.path.join(MULTIPROC_DIR, "*.db")):
        if not path.endswith(own):
            os.remove(path)


def mark_process_dead(pid: int | None = None) -> None:
    """Drop a finished child's live gauges (multiprocess mode only); a no-op otherwise."""
    if MULTIPROC_DIR:
        target = pid if pid is not None else os.getpid()
        multiprocess.mark_process_dead(target, MULTIPROC_DIR)  # type: ignore[no-untyped-call]
