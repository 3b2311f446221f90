"""A worker starts consuming without Celery's mingle (a second's wait for other workers' revoked task ids, which
AIQ never has), unless the environment asks for it."""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.support.stack import Stack, spawn_worker, stop


def _mingle_lines(log_path: Path) -> list[str]:
    return [line for line in log_path.read_text(errors="replace").splitlines() if "mingle:" in line]


def test_a_worker_starts_without_mingle_and_an_operator_can_turn_it_back_on(stack: Stack, tmp_path: Path) -> None:
    # Their own queue: neither worker takes the stack's work.
    queue = f"aiq.startup.{uuid.uuid4().hex[:6]}"
    plain_log, mingling_log = tmp_path / "plain.log", tmp_path / "mingling.log"
    plain, _ = spawn_worker(stack, plain_log, QUEUE_NAME=queue)
    try:
        # spawn_worker returned on the worker's "ready." line: mingle would have logged before it.
        assert _mingle_lines(plain_log) == []
        mingling, _ = spawn_worker(stack, mingling_log, QUEUE_NAME=queue, CELERY_WORKER_WITHOUT_MINGLE="false")
        try:
            assert any("mingle: searching for neighbors" in line for line in _mingle_lines(mingling_log))
        finally:
            stop(mingling)
    finally:
        stop(plain)
