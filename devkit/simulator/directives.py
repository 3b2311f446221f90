"""`[[sim key=value ...]]` directives, token estimates and the deterministic answer text."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

FAIL_KINDS = frozenset({"429", "500", "hang", "drop", "quota", "400", "401", "404"})

_DIRECTIVE_RE = re.compile(r"\[\[sim(?:\s+([^\]]*))?\]\]")

# Padding vocabulary for generated answers; one word is one "token" in the simulator's accounting.
_WORDS = (
    "queue",
    "worker",
    "retry",
    "latency",
    "token",
    "answer",
    "model",
    "stream",
    "backoff",
    "broker",
    "task",
    "result",
    "status",
    "poll",
    "cluster",
    "replica",
    "shard",
    "cache",
    "batch",
    "request",
    "response",
    "budget",
    "signal",
)


class DirectiveError(ValueError):
    """A `[[sim ...]]` directive could not be parsed."""


@dataclass(frozen=True, slots=True)
class Directives:
    """The directives found in one request; `None` means "not given"."""

    fail: str | None = None
    times: int | None = None
    retry_after: str | None = None
    latency_ms: float | None = None
    tokens: int | None = None
    # Streaming only: a pause of this many ms before each content chunk (a slow stream, one word a chunk).
    chunk_ms: float | None = None
    # `echo=messages`: the answer is the request's messages as JSON, `[[role, text], ...]`, so a test can see
    # what a client sent upstream (roles, order, text) without the simulator recording anything.
    echo: bool = False


NO_DIRECTIVES = Directives()


def message_text(content: Any) -> str:
    """The text of a message `content`, which is a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
        return "".join(parts)
    return ""


def last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    """The text of the last message with role `user` (empty if there is none)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


def parse_directives(text: str) -> Directives:
    """Parse every `[[sim ...]]` block in `text`; later keys override earlier ones."""
    if "[[sim" not in text:
        return NO_DIRECTIVES
    pairs: dict[str, str] = {}
    for match in _DIRECTIVE_RE.finditer(text):
        for token in (match.group(1) or "").split():
            key, sep, value = token.partition("=")
            if not sep or not value:
                raise DirectiveError(f"simulator directive {token!r} is not key=value")
            pairs[key.lower()] = value
    unknown = sorted(set(pairs) - {"fail", "times", "retry_after", "latency_ms", "tokens", "chunk_ms", "echo"})
    if unknown:
        raise DirectiveError(f"unknown simulator directive key(s): {', '.join(unknown)}")

    fail = pairs.get("fail")
    if fail is not None:
        fail = fail.lower()
        if fail not in FAIL_KINDS:
            raise DirectiveError(f"fail must be one of {', '.join(sorted(FAIL_KINDS))}, got {fail!r}")
    retry_after = pairs.get("retry_after")
    if retry_after is not None:
        _non_negative_float("retry_after", retry_after)
    echo = pairs.get("echo")
    if echo is not None and echo.lower() != "messages":
        raise DirectiveError(f"echo must be 'messages', got {echo!r}")
    latency = pairs.get("latency_ms")
    chunk = pairs.get("chunk_ms")
    return Directives(
        fail=fail,
        times=_non_negative_int("times", pairs["times"]) if "times" in pairs else None,
        retry_after=retry_after,
        latency_ms=_non_negative_float("latency_ms", latency) if latency is not None else None,
        tokens=_non_negative_int("tokens", pairs["tokens"]) if "tokens" in pairs else None,
        chunk_ms=_non_negative_float("chunk_ms", chunk) if chunk is not None else None,
        echo=echo is not None,
    )


def _non_negative_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise DirectiveError(f"{name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise DirectiveError(f"{name} must be >= 0, got {value}")
    return value


def _non_negative_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise DirectiveError(f"{name} must be a number, got {raw!r}") from None
    if not value >= 0:  # also rejects NaN
        raise DirectiveError(f"{name} must be >= 0, got {raw!r}")
    return value


def prompt_chars(messages: Sequence[dict[str, Any]]) -> int:
    """Total characters of all message contents."""
    return sum(len(message_text(message.get("content"))) for message in messages)


def estimate_tokens(chars: int) -> int:
    """OpenAI's rule of thumb, about four characters per token, rounded up."""
    return -(-chars // 4)


def echoed_messages(messages: Sequence[dict[str, Any]]) -> str:
    """The answer of `echo=messages`: each message's role and text, and its `name` when it has one, in order, as
    JSON."""
    return json.dumps(
        [
            [
                message.get("role"),
                message_text(message.get("content")),
                *([message["name"]] if "name" in message else []),
            ]
            for message in messages
        ]
    )


def answer_text(tokens: int, chars: int, seed_text: str) -> str:
    """A deterministic answer of exactly `tokens` words for a prompt of `chars` characters."""
    if tokens <= 0:
        return ""
    words = f"Simulated answer ({tokens} tokens) to a {chars}-char prompt.".split()
    if tokens <= len(words):
        return " ".join(words[:tokens])
    # The padding starts at a prompt-dependent word so different prompts get different answers.
    start = zlib.crc32(seed_text.encode("utf-8", "surrogatepass"))
    size = len(_WORDS)
    words.extend(_WORDS[(start + i) % size] for i in range(tokens - len(words)))
    return " ".join(words)
