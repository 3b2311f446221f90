"""Engines and sessions, built once per process (never at import time)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from shared.config import Settings


def make_engine(settings: Settings, application_name: str) -> AsyncEngine:
    """An asyncpg engine tagged with the process role, so `pg_stat_activity` tells who is who."""
    return create_async_engine(
        settings.async_database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"server_settings": {"application_name": application_name}},
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit, so responses can be built from them."""
    return async_sessionmaker(engine, expire_on_commit=False)
