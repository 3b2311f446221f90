"""The OpenAI view of a query: Responses and chat completions are two spellings of one query row.

A response id is `resp_<hex of the query id>`, a chat completion id `chatcmpl-<hex>`: no table of its own, so
one row, one lifecycle, one set of limits whichever door a query came in by. Requests become a `ConversationCreate`
(the native submit's body plus a conversation's earlier turns) here, and a `QueryOut` becomes OpenAI's objects here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from shared.errors import AppError, InvalidInput, NotFound
from shared.models import QueryStatus
from shared.repositories.queries_common import RowLike
from shared.schemas import ConversationCreate, QueryOut
from shared.schemas_openai import ChatCompletionCreate, ChatMessage, InputMessage, ResponseCreate, TextPart

RESPONSE_PREFIX = "resp_"
CHAT_PREFIX = "chatcmpl-"
MESSAGE_PREFIX = "msg_"
_SYSTEM_ROLES = frozenset({"system", "developer"})
# ConversationCreate's field → where the client wrote it, for the error's `param`.
CHAT_PARAMS = {
    "query": "messages",
    "system": "messages",
    "history": "messages",
    "prompt_name": "messages",
    "max_tokens": "max_completion_tokens",
}
RESPONSE_PARAMS = {"query": "input", "system": "instructions", "history": "input", "max_tokens": "max_output_tokens"}


def response_id(query_id: uuid.UUID) -> str:
    return f"{RESPONSE_PREFIX}{query_id.hex}"


def chat_completion_id(query_id: uuid.UUID) -> str:
    return f"{CHAT_PREFIX}{query_id.hex}"


def uuid_after(public_id: str, prefix: str) -> uuid.UUID | None:
    """The uuid inside an OpenAI-style public id `<prefix><hex>` (responses, chat completions, files, batches);
    None for anything else, which callers answer like a missing object."""
    if public_id.startswith(prefix):
        try:
            return uuid.UUID(hex=public_id[len(prefix) :])
        except ValueError:
            pass
    return None


def list_object(rows: Sequence[RowLike], limit: int, to_object: Callable[[RowLike], dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's cursor list from up to `limit + 1` rows, newest first (the extra row only says there is more)."""
    data = [to_object(r) for r in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(rows) > limit,
    }


def parse_id(public_id: str, prefix: str, what: str) -> uuid.UUID:
    """The query id inside a public id; anything else is a 404, like a missing one."""
    found = uuid_after(public_id, prefix)
    if found is None:
        raise NotFound(f"No {what} found with id '{public_id[:80]}'", code="not_found")
    return found


def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "\n".join(part.text for part in content)


def _conversation(
    messages: list[ChatMessage] | list[InputMessage], instructions: str | None, param: str
) -> tuple[str | None, dict[str, str], list[dict[str, str]] | None]:
    """System prompt, final user message and earlier turns of a message list.

    System and developer messages (after `instructions`) become the system prompt; the final user message is
    the prompt (`content`, and `name` when the message names its participant); the user and assistant turns
    before it are the history (None for a single message), which the model receives as messages of their own,
    in order, names included.
    """
    system = [instructions] if instructions else []
    turns: list[dict[str, str]] = []
    for message in messages:
        text = _text(message.content)
        if message.role in _SYSTEM_ROLES:
            system.append(text)
            continue
        turn = {"role": message.role, "content": text}
        name = getattr(message, "name", None)  # chat messages have one; Responses input messages do not
        if name is not None:
            turn["name"] = name
        turns.append(turn)
    if not turns or turns[-1]["role"] != "user":
        raise InvalidInput(
            f"'{param}' must end with a user message",
            code="invalid_value",
            details=[{"loc": ["body", param], "msg": "must end with a user message", "type": "invalid_value"}],
        )
    return ("\n\n".join(system) if system else None), turns[-1], turns[:-1] or None


def _query_create(fields: dict[str, Any], params: dict[str, str]) -> ConversationCreate:
    try:
        return ConversationCreate(**fields)
    except ValidationError as exc:
        details = [
            {
                "loc": ["body", *(params.get(str(p), str(p)) for p in e["loc"][:1])],
                "msg": e["msg"] if e["type"] != "invalid_unicode" else "Text must be valid Unicode",
                "type": e["type"],
            }
            for e in exc.errors()
        ]
        raise InvalidInput("Request is invalid", code="invalid_value", details=details) from exc


def name_params(exc: InvalidInput, params: dict[str, str]) -> InvalidInput:
    """A refused submission's error with each `loc` naming the field where the client wrote it (`CHAT_PARAMS`,
    `RESPONSE_PARAMS`): `query_too_long` is about `messages`, not the native `query`."""
    for detail in exc.details or ():
        loc = detail.get("loc")
        if isinstance(loc, list) and len(loc) > 1 and loc[0] == "body":
            detail["loc"] = ["body", params.get(str(loc[1]), loc[1]), *loc[2:]]
    return exc


def query_from_chat(body: ChatCompletionCreate) -> ConversationCreate:
    """The submission of a chat completion request."""
    system, prompt, history = _conversation(body.messages, None, "messages")
    fields = {
        "query": prompt["content"],
        "prompt_name": prompt.get("name"),
        "system": system,
        "history": history,
        "model": body.model,
        "temperature": body.temperature,
        "max_tokens": body.max_completion_tokens or body.max_tokens,
        "metadata": body.metadata,
    }
    return _query_create(fields, CHAT_PARAMS)


def query_from_response(body: ResponseCreate) -> ConversationCreate:
    """The submission of a Responses request."""
    history: list[dict[str, str]] | None = None
    if isinstance(body.input, str):
        system, prompt = body.instructions, body.input
    else:
        system, final, history = _conversation(body.input, body.instructions, "input")
        prompt = final["content"]
    fields = {
        "query": prompt,
        "system": system,
        "history": history,
        "model": body.model,
        "temperature": body.temperature,
        "max_tokens": body.max_output_tokens,
        "metadata": body.metadata,
    }
    return _query_create(fields, RESPONSE_PARAMS)


def response_status(query: QueryOut) -> str:
    """queued → in_progress → completed | failed | cancelled | incomplete."""
    if query.status == QueryStatus.PENDING:
        # A retry waiting for its next attempt has started already.
        return "queued" if query.attempts == 0 else "in_progress"
    if query.status == QueryStatus.RUNNING:
        return "in_progress"
    if query.status == QueryStatus.COMPLETED and _hit_token_cap(query):
        return "incomplete"
    return query.status.value


def _hit_token_cap(query: QueryOut) -> bool:
    # The row keeps no finish reason: an answer as long as its cap is taken as cut off by it.
    used = query.usage.completion_tokens if query.usage else None
    return query.max_tokens is not None and used is not None and used >= query.max_tokens


def _error_code(code: str) -> str:
    return "rate_limit_exceeded" if code in ("upstream_rate_limited", "upstream_quota_exceeded") else "server_error"


def _timestamp(query: QueryOut) -> int:
    return int(query.created_at.timestamp())


def response_object(query: QueryOut) -> dict[str, Any]:
    """A query as an OpenAI `response` object; `background` as it was created (false for other doors' rows)."""
    status = response_status(query)
    output: list[dict[str, Any]] = []
    if query.response is not None:
        output.append(
            {
                "type": "message",
                "id": f"{MESSAGE_PREFIX}{query.query_id.hex}",
                "status": "incomplete" if status == "incomplete" else "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": query.response, "annotations": [], "logprobs": []}],
            }
        )
    usage = query.usage
    return {
        "id": response_id(query.query_id),
        "object": "response",
        "created_at": _timestamp(query),
        "completed_at": int(query.finished_at.timestamp()) if query.finished_at and status == "completed" else None,
        "status": status,
        "background": query.background,
        "error": (
            {"code": _error_code(query.error.code), "message": f"{query.error.message} ({query.error.code})"}
            if query.error and query.status == QueryStatus.FAILED
            else None
        ),
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": query.system,
        "max_output_tokens": query.max_tokens,
        "metadata": query.metadata or {},
        "model": query.model,
        "output": output,
        "parallel_tool_calls": False,
        "temperature": query.temperature,
        "tool_choice": "none",
        "tools": [],
        "top_p": None,
        "text": {"format": {"type": "text"}},
        "usage": {
            "input_tokens": usage.prompt_tokens or 0,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage.completion_tokens or 0,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens or 0,
        }
        if usage
        else None,
    }


def _chat_usage(query: QueryOut) -> dict[str, int] | None:
    if query.usage is None:
        return None
    return {
        "prompt_tokens": query.usage.prompt_tokens or 0,
        "completion_tokens": query.usage.completion_tokens or 0,
        "total_tokens": query.usage.total_tokens or 0,
    }


def finish_reason(query: QueryOut) -> str:
    return "length" if _hit_token_cap(query) else "stop"


def chat_completion_object(query: QueryOut) -> dict[str, Any]:
    """A completed query as an OpenAI `chat.completion`; a query that did not complete is an error instead."""
    raise_unless_completed(query)
    return {
        "id": chat_completion_id(query.query_id),
        "object": "chat.completion",
        "created": _timestamp(query),
        "model": query.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": query.response or "", "refusal": None},
                "finish_reason": finish_reason(query),
                "logprobs": None,
            }
        ],
        "usage": _chat_usage(query),
    }


def raise_unless_completed(query: QueryOut) -> None:
    """The error a chat completion answers when its query did not complete (or is still running)."""
    ref = response_id(query.query_id)
    if query.status == QueryStatus.COMPLETED:
        return
    if query.status == QueryStatus.CANCELLED:
        raise AppError(f"The request was cancelled ({ref})", status_code=400, code="request_cancelled")
    if query.status == QueryStatus.FAILED:
        assert query.error is not None
        # The queue has retried already; a 502 lets the SDK's own retries (if any) submit a fresh query.
        status = 400 if query.error.code == "upstream_bad_request" else 502
        raise AppError(f"{query.error.message} ({query.error.code}, {ref})", status_code=status, code=query.error.code)
    raise AppError(
        f"Still waiting for the answer; retrieve it later as GET /v1/responses/{ref}",
        status_code=504,
        code="timeout",
    )


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseEvents:
    """A query's event log told as OpenAI's Responses stream events (without `sequence_number`: the stream
    numbers them in order, so the same log always gives the same numbers and a client resumes by number).

    response.created → response.queued → response.in_progress → response.output_item.added →
    response.content_part.added → response.output_text.delta … → response.output_text.done →
    response.content_part.done → response.output_item.done → response.completed | incomplete | failed |
    cancelled. A retried attempt's text cannot be taken back on the wire: the `done` events and the final
    response carry the answer as stored.
    """

    def __init__(self, query: QueryOut) -> None:
        self.query = query
        self._item_id = f"{MESSAGE_PREFIX}{query.query_id.hex}"
        self._in_progress = False
        self._item_added = False

    def _response(self, query: QueryOut, status: str | None = None) -> dict[str, Any]:
        obj = response_object(query)
        if status is not None:
            obj["status"] = status
        return obj

    def start(self) -> list[dict[str, Any]]:
        return [{"type": "response.created", "response": self._response(self.query, "queued")}]

    def _item(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [_text_part(text)]
        return {"type": "message", "id": self._item_id, "status": status, "role": "assistant", "content": content}

    def _add_item(self) -> list[dict[str, Any]]:
        if self._item_added:
            return []
        self._item_added = True
        where = {"item_id": self._item_id, "output_index": 0}
        return [
            *self._progress(),
            {"type": "response.output_item.added", "output_index": 0, "item": self._item("in_progress", None)},
            {"type": "response.content_part.added", **where, "content_index": 0, "part": _text_part("")},
        ]

    def _progress(self) -> list[dict[str, Any]]:
        if self._in_progress:
            return []
        self._in_progress = True
        return [{"type": "response.in_progress", "response": self._response(self.query, "in_progress")}]

    def event(self, type_: str, data: dict[str, Any]) -> list[dict[str, Any]]:
        """The OpenAI events of one non-terminal log event."""
        if type_ == "queued":
            return [{"type": "response.queued", "response": self._response(self.query, "queued")}]
        if type_ == "started":
            return self._progress()
        if type_ == "delta" and data.get("text"):
            delta = {"item_id": self._item_id, "output_index": 0, "content_index": 0, "logprobs": []}
            return [*self._add_item(), {"type": "response.output_text.delta", **delta, "delta": data["text"]}]
        return []

    def finish(self, query: QueryOut) -> list[dict[str, Any]]:
        """The closing events, from the finished row."""
        status = response_status(query)
        out: list[dict[str, Any]] = []
        if query.response is not None:
            out += self._add_item()
        if self._item_added:
            text = query.response or ""
            where = {"item_id": self._item_id, "output_index": 0, "content_index": 0}
            item_status = "incomplete" if status == "incomplete" else "completed"
            out += [
                {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
                {"type": "response.content_part.done", **where, "part": _text_part(text)},
                {"type": "response.output_item.done", "output_index": 0, "item": self._item(item_status, text)},
            ]
        out.append({"type": f"response.{status}", "response": self._response(query)})
        return out


class ChatChunks:
    """A query's event log told as `chat.completion.chunk` objects (`data: [DONE]` is the stream's own)."""

    def __init__(self, query: QueryOut, *, include_usage: bool) -> None:
        self.query = query
        self.include_usage = include_usage

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": chat_completion_id(self.query.query_id),
            "object": "chat.completion.chunk",
            "created": _timestamp(self.query),
            "model": self.query.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **({"usage": None} if self.include_usage else {}),
        }

    def start(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def event(self, type_: str, data: dict[str, Any]) -> list[dict[str, Any]]:
        if type_ == "delta" and data.get("text"):
            return [self._chunk({"content": data["text"]})]
        return []

    def finish(self, query: QueryOut) -> list[dict[str, Any]]:
        """The last chunk (and the usage chunk when asked for); a query that did not complete is an error
        object, which the SDK raises as an APIError."""
        if query.status != QueryStatus.COMPLETED:
            try:
                raise_unless_completed(query)
            except AppError as exc:
                return [{"error": {"message": exc.message, "type": "server_error", "param": None, "code": exc.code}}]
        out = [self._chunk({}, finish_reason(query))]
        if self.include_usage:
            out.append({**self._chunk({}), "choices": [], "usage": _chat_usage(query)})
        return out
