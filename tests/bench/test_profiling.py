"""The worker's profile by step (bench/profiling.py), on collapsed stacks written as py-spy writes them."""

from __future__ import annotations

from pathlib import Path

from bench.profiling import SAMPLE_HZ, WORKER_STEPS, ms_per_answer, summarize_profile

STACKS = [
    # The consumer thread, even where kombu reads through redis-py.
    "_run_module_as_main (<frozen runpy>:198);asynloop (celery/worker/loops.py:97);"
    "Channel._brpop_read (kombu/transport/redis.py:1310);Redis.parse_response (redis/client.py:650) 3",
    # The SDK call on the loop thread; then a coroutine resumed inside it (no thread frames above).
    "Thread.run (threading.py:982);run_task (worker/runtime.py:201);_attempt (worker/processing.py:341);"
    "complete (shared/llm.py:238);AsyncCompletions.create (openai/resources/chat/completions/completions.py:3414) 5",
    "ResponseHandler.data_received (aiohttp/client_proto.py:359) 2",
    # The end's batch runs redis-py: it counts as the end, not as redis-py.
    "_end (worker/processing.py:152);ScriptBatch.run (shared/scriptbatch.py:50);"
    "Pipeline.execute (redis/asyncio/client.py:2243) 4",
    "Connection._do_execute (asyncpg/connection.py:2066) 2",
    "Redis.execute_command (redis/asyncio/client.py:929) 1",
    "Thread.run (threading.py:982) 3",
]


def test_each_sample_goes_to_the_first_step_it_shows(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    raw.write_text("\n".join(STACKS) + "\n")
    summary = summarize_profile(raw, steps=WORKER_STEPS)
    assert summary["samples"] == 20
    assert summary["by_step_samples"] == {
        "the SDK call": 7,
        "the end's batch": 4,
        "Celery's consumer": 3,
        "the loop and the rest": 3,
        "PostgreSQL": 2,
        "redis-py": 1,
    }
    # Without steps (the API's profiles) there is no such breakdown.
    assert "by_step_samples" not in summarize_profile(raw)


def test_samples_become_cpu_ms_per_answer() -> None:
    # SAMPLE_HZ samples are one second of CPU; over 100 answers, 10 ms each.
    assert ms_per_answer({"the SDK call": SAMPLE_HZ}, 100) == {"the SDK call": 10.0}
