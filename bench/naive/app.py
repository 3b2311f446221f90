"""The reference API: `uvicorn bench.naive.app:app` — sync endpoints, one ORM session per request."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated

import jwt
from fastapi import Depends, FastAPI, HTTPException, status
from fastapi.security import OAuth2PasswordBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from bench.naive.db import NaiveQuery, SessionLocal
from bench.naive.tasks import process_query

JWT_SECRET = os.environ.get("NAIVE_JWT_SECRET", "")
DEFAULT_MODEL = os.environ.get("NAIVE_MODEL", "gpt-4o-mini")

app = FastAPI(title="naive")
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/token")


class QueryIn(BaseModel):
    query: str = Field(min_length=1, max_length=32_000)
    model: str | None = None


class QueryAccepted(BaseModel):
    query_id: uuid.UUID
    status: str
    model: str
    created_at: datetime


class QueryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    status: str
    prompt: str
    model: str
    response: str | None
    error: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    created_at: datetime
    finished_at: datetime | None


def get_db() -> Iterator[Session]:
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()


def get_current_user_id(token: Annotated[str, Depends(oauth2_scheme)]) -> uuid.UUID:
    try:
        payload = jwt.decode(token, JWT_SECRET, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        return uuid.UUID(payload["sub"])
    except (jwt.InvalidTokenError, ValueError, KeyError) as exc:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="Could not validate credentials",
            headers={"WWW-Authenticate": "Bearer"},
        ) from exc


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/api/v1/query", status_code=status.HTTP_202_ACCEPTED, response_model=QueryAccepted)
def submit(
    body: QueryIn,
    user_id: Annotated[uuid.UUID, Depends(get_current_user_id)],
    db: Annotated[Session, Depends(get_db)],
) -> QueryAccepted:
    query = NaiveQuery(user_id=user_id, prompt=body.query, model=body.model or DEFAULT_MODEL)
    db.add(query)
    db.commit()
    db.refresh(query)
    process_query.delay(str(query.id))
    return QueryAccepted(query_id=query.id, status=query.status, model=query.model, created_at=query.created_at)


@app.get("/api/v1/query/{query_id}", response_model=QueryOut)
def get_query(
    query_id: uuid.UUID,
    user_id: Annotated[uuid.UUID, Depends(get_current_user_id)],
    db: Annotated[Session, Depends(get_db)],
) -> NaiveQuery:
    query = db.get(NaiveQuery, query_id)
    if query is None or query.user_id != user_id:
        raise HTTPException(status_code=404, detail="Query not found")
    return query
