"""The query lifecycle: submit, read, list, and each worker-side transition."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncSession

from shared.config import Settings
from shared.errors import InvalidInput, NotFound
from shared.models import Query, QueryStatus
from shared.repositories import queries as repo
from shared.repositories.queries import Claim
from shared.schemas import QueryCreate, QueryError, QueryOut, QueryPage, Usage


def _invalid(field: str, message: str, code: str) -> InvalidInput:
    return InvalidInput(message, code=code, details=[{"loc": ["body", field], "msg": message, "type": code}])


def validate_submission(settings: Settings, body: QueryCreate) -> str:
    """Checks that depend on configuration; returns the model to use."""
    model = body.model or settings.default_model
    if model not in settings.allowed_models:
        raise _invalid("model", f"Model {model!r} is not allowed; choose one of {settings.allowed_models}", "model_not_allowed")
    if not body.query.strip():
        raise _invalid("query", "Query must not be blank", "query_blank")
    if len(body.query) > settings.max_query_chars:
        raise _invalid("query", f"Query is longer than {settings.max_query_chars} characters", "query_too_long")
    if body.system is not None and len(body.system) > settings.max_query_chars:
        raise _invalid("system", f"System prompt is longer than {settings.max_query_chars} characters", "system_too_long")
    if body.max_tokens is not None and body.max_tokens > settings.max_output_tokens:
        raise _invalid("max_tokens", f"max_tokens must be at most {settings.max_output_tokens}", "max_tokens_too_large")
    if body.metadata is not None and len(json.dumps(body.metadata)) > settings.max_metadata_bytes:
        raise _invalid("metadata", f"metadata must serialize to at most {settings.max_metadata_bytes} bytes", "metadata_too_large")
    return model


async def submit_query(session: AsyncSession, settings: Settings, user_id: uuid.UUID, body: QueryCreate) -> Query:
    """Store a pending query; the caller commits, then enqueues its id."""
    model = validate_submission(settings, body)
    query = Query(
        id=uuid.uuid4(),
        user_id=user_id,
        prompt=body.query,
        system=body.system,
        model=model,
        temperature=body.temperature,
        max_tokens=body.max_tokens,
        meta=body.metadata,
        status=QueryStatus.PENDING,
        attempts=0,
        created_at=datetime.now(UTC),
    )
    session.add(query)
    await session.flush()
    return query


async def get_query(session: AsyncSession, user_id: uuid.UUID, query_id: uuid.UUID) -> Query:
    """The caller's query, or 404 for a missing one and for anybody else's alike."""
    query = await repo.get_for_user(session, query_id, user_id)
    if query is None:
        raise NotFound("Query not found", code="query_not_found")
    return query


def encode_cursor(query: Query) -> str:
    raw = f"{query.created_at.isoformat()}|{query.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, _, query_id = raw.partition("|")
        parsed = datetime.fromisoformat(created_at)
        if parsed.tzinfo is None:
            raise ValueError("naive timestamp")
        return parsed, uuid.UUID(query_id)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput(
            "Invalid cursor", code="invalid_cursor", details=[{"loc": ["query", "cursor"], "msg": "not a cursor from this API", "type": "invalid_cursor"}]
        ) from exc


async def list_queries(
    session: AsyncSession, user_id: uuid.UUID, *, status: QueryStatus | None, cursor: str | None, limit: int
) -> QueryPage:
    """One page of the caller's queries, newest first."""
    before = decode_cursor(cursor) if cursor else None
    rows = await repo.list_for_user(session, user_id, status=status, before=before, limit=limit + 1)
    items, more = rows[:limit], len(rows) > limit
    return QueryPage(items=[to_out(q) for q in items], next_cursor=encode_cursor(items[-1]) if more else None)


def to_out(query: Query) -> QueryOut:
    """The public view of a row."""
    error = QueryError(code=query.error_code, message=query.error_message or "") if query.error_code else None
    return QueryOut(
        query_id=query.id,
        status=QueryStatus(query.status),
        query=query.prompt,
        system=query.system,
        model=query.model,
        temperature=query.temperature,
        max_tokens=query.max_tokens,
        metadata=query.meta,
        response=query.response,
        error=error,
        usage=Usage(
            prompt_tokens=query.prompt_tokens,
            completion_tokens=query.completion_tokens,
            total_tokens=query.total_tokens,
        ),
        attempts=query.attempts,
        created_at=query.created_at,
        started_at=query.started_at,
        finished_at=query.finished_at,
    )


async def claim_for_attempt(session: AsyncSession, settings: Settings, query_id: uuid.UUID, owner: str) -> Claim | None:
    """pending → running for one attempt, with a lease; None if this delivery must not call the LLM."""
    return await repo.claim(session, query_id, owner, timedelta(seconds=settings.effective_lease_seconds))


async def record_completion(
    session: AsyncSession,
    claim: Claim,
    *,
    response: str,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    total_tokens: int | None,
    latency_ms: int,
) -> bool:
    """running → completed; False when this attempt lost the row (reclaimed or cancelled)."""
    return await repo.finish_attempt(
        session,
        claim.query_id,
        claim.attempt,
        status=QueryStatus.COMPLETED,
        response=response,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=total_tokens,
        llm_latency_ms=latency_ms,
        error_code=None,
        error_message=None,
        finished_at=func.now(),
    )


async def record_failure(session: AsyncSession, claim: Claim, *, code: str, message: str) -> bool:
    """running → failed for good."""
    return await repo.finish_attempt(
        session,
        claim.query_id,
        claim.attempt,
        status=QueryStatus.FAILED,
        error_code=code,
        error_message=message,
        finished_at=func.now(),
    )


async def schedule_retry(session: AsyncSession, claim: Claim, *, delay_seconds: float, code: str, message: str) -> bool:
    """running → pending, due after the delay; the last error stays visible meanwhile."""
    return await repo.finish_attempt(
        session,
        claim.query_id,
        claim.attempt,
        status=QueryStatus.PENDING,
        next_attempt_at=func.now() + timedelta(seconds=delay_seconds),
        error_code=code,
        error_message=message,
    )
