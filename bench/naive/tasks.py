"""The reference worker: `celery -A bench.naive.tasks worker` with Celery's defaults (prefork, cores, prefetch 4)."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime

from celery import Celery
from openai import OpenAI

from bench.naive.db import NaiveQuery, SessionLocal

celery_app = Celery(
    "naive",
    broker=os.environ.get("NAIVE_BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("NAIVE_RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
celery_app.conf.task_default_queue = os.environ.get("NAIVE_QUEUE", "naive")

client = OpenAI(
    base_url=os.environ.get("OPENAI_BASE_URL"),
    api_key=os.environ.get("OPENAI_API_KEY", "unset"),
)


@celery_app.task(name="naive.process_query")
def process_query(query_id: str) -> dict[str, str]:
    db = SessionLocal()
    try:
        query = db.get(NaiveQuery, uuid.UUID(query_id))
        if query is None:
            return {"query_id": query_id, "status": "missing"}
        query.status = "running"
        # Python's clock, not the database's now(): that is the start of the session's transaction,
        # which began with the SELECT above, before the call.
        query.started_at = datetime.now(UTC)
        db.commit()
        started = time.perf_counter()
        try:
            completion = client.chat.completions.create(
                model=query.model, messages=[{"role": "user", "content": query.prompt}]
            )
        except Exception as exc:
            query.status = "failed"
            query.error = type(exc).__name__
            query.finished_at = datetime.now(UTC)
            db.commit()
            raise
        query.llm_latency_ms = round((time.perf_counter() - started) * 1000)
        query.response = completion.choices[0].message.content
        if completion.usage is not None:
            query.prompt_tokens = completion.usage.prompt_tokens
            query.completion_tokens = completion.usage.completion_tokens
            query.total_tokens = completion.usage.total_tokens
        query.status = "completed"
        query.finished_at = datetime.now(UTC)
        db.commit()
        return {"query_id": query_id, "status": query.status}
    finally:
        db.close()
