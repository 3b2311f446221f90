"""`SessionDep` owns the transaction: commit when the route returns, roll back when it raises, and a commit
that fails answers an error instead of the route's 2xx (the dependency exits before the response is sent)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from api.deps import SessionDep
from api.errors import install_error_handlers
from shared.config import Settings
from shared.db import make_engine, make_sessionmaker
from shared.errors import Conflict
from shared.models import User
from shared.repositories import users as users_repo
from tests.support.db import count_rows

router = APIRouter()


@router.post("/users/{email}")
async def create_user(email: str, session: SessionDep) -> dict[str, Any]:
    await users_repo.create(session, email, "not-a-hash")
    return {"created": email}


@router.post("/users/{email}/then-refuse")
async def create_user_then_refuse(email: str, session: SessionDep) -> dict[str, Any]:
    await users_repo.create(session, email, "not-a-hash")
    raise Conflict("refused after the write", code="refused")


@router.post("/users/{email}/unflushed")
async def add_user_unflushed(email: str, session: SessionDep) -> dict[str, Any]:
    # Nothing reaches the database before the dependency's commit flushes it.
    session.add(User(id=uuid.uuid4(), email=email, password_hash="not-a-hash"))
    return {"created": email}


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    settings = Settings(database_url=database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings, "aiq-test")
        app.state.sessionmaker = make_sessionmaker(engine)
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(router)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _users(db: Engine, email: str) -> int:
    return count_rows(db, "SELECT count(*) FROM users WHERE email = :e", e=email)


def _email() -> str:
    return f"tx-{uuid.uuid4().hex[:10]}@example.com"


def test_the_session_commits_when_the_route_returns(client: TestClient, db: Engine) -> None:
    email = _email()
    assert client.post(f"/users/{email}").status_code == 200
    assert _users(db, email) == 1


def test_the_session_rolls_back_when_the_route_raises(client: TestClient, db: Engine) -> None:
    email = _email()
    r = client.post(f"/users/{email}/then-refuse")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "refused"
    assert _users(db, email) == 0


def test_a_commit_that_fails_answers_an_error_not_the_routes_2xx(client: TestClient, db: Engine) -> None:
    email = _email()
    assert client.post(f"/users/{email}").status_code == 200
    # The duplicate email only fails at commit, after the route has returned its 200 body.
    r = client.post(f"/users/{email}/unflushed")
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"
    assert _users(db, email) == 1


def test_an_unflushed_write_is_committed_by_the_dependency(client: TestClient, db: Engine) -> None:
    email = _email()
    assert client.post(f"/users/{email}/unflushed").status_code == 200
    assert _users(db, email) == 1
