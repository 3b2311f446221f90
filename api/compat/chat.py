"""`POST /v1/chat/completions` through the queue: the request waits for its query (or streams it)."""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from api.compat import compat_router
from api.compat.errors import openai_error_responses
from api.compat.streaming import event_stream_response, submitter_stream_context
from api.compat.submit import submit, submit_and_wait
from api.deps import HandlesDep, SubmitterDep
from shared.schemas_openai import ChatCompletion, ChatCompletionChunk, ChatCompletionCreate, OpenAIErrorBody
from shared.services import responses as service

router = compat_router()


@router.post(
    "/chat/completions",
    response_model=None,
    responses={
        200: event_stream_response(
            ChatCompletion,
            "`stream: true`: `chat.completion.chunk`s as `data:` lines, then `data: [DONE]`",
            'A `chat.completion.chunk` as JSON, or an `{"error": …}` object for a query that did not complete; '
            "the last event's is `[DONE]`",
            {"type": "string", "const": "message", "description": "Unnamed (`data:` lines only)"},
            (ChatCompletionChunk, OpenAIErrorBody),
            "[DONE]",
        ),
        **openai_error_responses(400, 429, 502, 504),
    },
)
async def create_chat_completion(
    body: ChatCompletionCreate,
    request: Request,
    response: Response,
    caller: SubmitterDep,
    handles: HandlesDep,
) -> dict[str, Any] | StreamingResponse:
    """Create a chat completion through the queue: waited for, or streamed with `stream: true`.

    The conversation is enqueued as a query and answered in `chat.completion` form when it is done (or streamed
    as `chat.completion.chunk`s). A query that was cancelled, or that the provider refused, is a 400; one that
    failed upstream otherwise is a 502.

    The client must wait as long as the queue takes (COMPAT_WAIT_SECONDS at most, then a 504 that names the
    response id to retrieve it by): keep the SDK's `timeout` above it.
    """
    user_id = caller.user_id
    query = service.query_from_chat(body)
    if body.stream:
        streams = await submitter_stream_context(handles, caller)
        upkeep = await streams.reserve()
        try:
            created = await submit(handles, user_id, query, response, service.CHAT_PARAMS)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            translator = service.ChatChunks(created, include_usage=include_usage)
            return streams.respond(request, created.query_id, translator, upkeep, chat=True)
        except BaseException:
            await upkeep.release()
            raise
    answered = await submit_and_wait(request, handles, caller, query, response, service.CHAT_PARAMS)
    return service.chat_completion_object(answered)
