"""`POST /v1/chat/completions` through the queue: the request waits for its query, then answers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from api.compat.submit import refuse_stream, submit, wait
from api.deps import CurrentUserId, PoolDep, PublisherDep, RedisDep, SettingsDep
from shared.schemas_openai import ChatCompletionCreate
from shared.services import responses as service

router = APIRouter()


@router.post("/chat/completions")
async def create_chat_completion(
    body: ChatCompletionCreate,
    request: Request,
    response: Response,
    user_id: CurrentUserId,
    settings: SettingsDep,
    pool: PoolDep,
    publisher: PublisherDep,
    redis: RedisDep,
) -> dict[str, Any]:
    """Enqueue the conversation as a query and answer in `chat.completion` form when it is done.

    The client must wait as long as the queue takes (COMPAT_WAIT_SECONDS at most, then a 504 that names the
    response id to retrieve it by): keep the SDK's `timeout` above it.
    """
    refuse_stream(body.stream)
    accepted = await submit(pool, settings, redis, publisher, user_id, service.query_from_chat(body), response)
    return service.chat_completion_object(await wait(request, pool, settings, user_id, accepted.query_id))
