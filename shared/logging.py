"""Structured JSON logs, one line per event. Only ids and codes go in: never prompts, tokens or secrets."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

# Set by the API's request-id middleware and by the worker around each task.
request_id_var: ContextVar[str | None] = ContextVar("aiq_request_id", default=None)
query_id_var: ContextVar[str | None] = ContextVar("aiq_query_id", default=None)

# Only these `extra` keys reach the output, so a careless `extra={"prompt": …}` is dropped.
ALLOWED_EXTRA = frozenset(
    {
        "query_id",
        "user_id",
        "status",
        "attempt",
        "code",
        "error",
        "kind",
        "delay_s",
        "latency_ms",
        "method",
        "path",
        "status_code",
        "duration_ms",
        "outcome",
        "model",
        "count",
        "owner",
        # Security events (shared/services/auth.py, admin.py): ids only, never token text.
        "event",
        "family_id",
        "actor_id",
    }
)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if (rid := request_id_var.get()) is not None:
            entry["request_id"] = rid
        if (qid := query_id_var.get()) is not None:
            entry["query_id"] = qid
        for key in ALLOWED_EXTRA & record.__dict__.keys():
            entry[key] = record.__dict__[key]
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: exception messages can carry request bodies or upstream text.
            entry["exc_type"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Route every logger through one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The SDK's HTTP layers log request details at DEBUG; keep them quiet even when debugging AIQ.
    # uvicorn installs its own plain-text handlers before the app is imported: send them through ours.
    # `--no-access-log` shows up as an access logger without handlers that does not propagate: keep it off.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if logger.handlers or logger.propagate:
            logger.handlers[:] = []
            logger.propagate = True
    for noisy in ("httpx", "httpx2", "httpcore", "openai", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
