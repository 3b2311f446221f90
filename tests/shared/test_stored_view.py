"""What `/v1` creates answer without reading their query back: the row as `submit_query` stored it."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis
from sqlalchemy.engine import Engine

from shared.cache import response_cache_for
from shared.config import Settings
from shared.db import make_raw_pool
from shared.limits import limiter_for
from shared.schemas import QueryCreate
from shared.services import queries as service
from tests.support.db import insert_user


@pytest.mark.anyio
async def test_the_stored_view_is_what_reading_the_new_row_back_gives(
    repo_db: Engine, repo_database_url: str, server_urls: dict[str, str]
) -> None:
    settings = Settings(
        database_url=repo_database_url, redis_url=server_urls["redis"], queue_name=f"aiq.view.{uuid.uuid4().hex[:6]}"
    )
    user_id = uuid.UUID(insert_user(repo_db))
    redis = aioredis.Redis.from_url(settings.redis_url)
    pool = await make_raw_pool(settings, "aiq-tests")
    limiter, cache = limiter_for(redis, settings), response_cache_for(redis, settings)
    body = QueryCreate(query="What is stored?", system="Be brief", temperature=0.3, max_tokens=50, metadata={"k": 1})
    try:
        for submitted in (body, QueryCreate(query="Plain")):
            _, _, row = await service.submit_query(pool, settings, limiter, cache, user_id, submitted)
            async with pool.acquire() as conn:
                read = await service.get_query(conn, user_id, row["id"])
            assert service.stored_view(row) == read
            assert read.status == "pending"
    finally:
        await pool.close()
        await redis.aclose()
