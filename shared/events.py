"""The per-query event log: a Redis Stream of what happened to a query, numbered 1, 2, 3 … per query.

One append is one Lua script (one round trip): INCR the query's sequence counter, XADD the event with the
explicit id `<seq>-0`, refresh the TTL of both keys, and PUBLISH a tiny wake-up notice
(`<query id> <event type>`) on the one channel every API process listens to (`shared/wakeup.py`). Stream ids
are the sequence numbers, so "the events after N" is one XRANGE from `(N-0`.

Who needs a notice: a terminal event wakes long-polls and streams alike, so it always sends one; any other
event (`started`, each `delta` …) matters only to a stream that follows the query. A follower marks the query
(`since(…, mark=True)`: SET of the follow key, then the XRANGE, in one round trip) and renews the mark while it
follows; the script sends a non-terminal event's notice only while the mark stands. Every API process's
subscriber then reads a notice per query end, not one per delta of every query. Nothing is missed: Redis runs
the script (XADD, then the mark's check) and the follower's SET-then-XRANGE each as a whole, so an event
appended before the mark is in the follower's read, and one appended after it sends its notice.

Keys (the query id is globally unique, the prefix keeps test runs that share a Redis apart):
- `aiq:{QUEUE_NAME}:ev:{query}`: the stream; fields `t` (type), `a` (attempt, "" when none), `d` (JSON data).
- `aiq:{QUEUE_NAME}:ev:{query}:seq`: the last sequence number given out.
- `aiq:{QUEUE_NAME}:ev:{query}:follow`: set while a stream follows the query (FOLLOW_MARK_SECONDS, renewed).
- channel `aiq:{QUEUE_NAME}:wake`: the notices.

The log is a convenience on top of the row, which stays the truth: a failed append is logged and the query
goes on; a reader that finds the log gone replays the row (`shared/services/events.py`). A log lost mid-story
(Redis restarted without it) begins again numbered from the clock, so a reader's position never lines up with
it: the reader sees the gap and replays the row rather than tell the new log's events as the rest of its own.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.config import Settings
from shared.metrics import EVENTS_PUBLISHED
from shared.scriptbatch import ScriptBatch

log = logging.getLogger(__name__)


class EventType(StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    DELTA = "delta"
    ATTEMPT_RESTARTED = "attempt_restarted"
    RETRY_SCHEDULED = "retry_scheduled"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_EVENTS = frozenset({EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED})
# How long a follower's mark stands unless renewed; a follower renews it well before (at a third of it, and
# whenever the wake-up resubscribed: a Redis restart lost it). Longer than a follower's longest wait between
# reads (`IDLE_REREAD_SECONDS` in shared/services/events.py), so a live follower never loses it.
FOLLOW_MARK_SECONDS = 90


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a query's log. `data` holds the type's own fields (e.g. `text` for a delta)."""

    seq: int
    type: EventType
    attempt: int | None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS

    def payload(self) -> dict[str, Any]:
        """The JSON object sent to clients: `seq`, `type`, `attempt` and the type's fields."""
        return {**self.data, "seq": self.seq, "type": self.type.value, "attempt": self.attempt}


# KEYS: stream, counter, follow mark. ARGV: type, attempt, data, ttl_s, channel, notice, reset, terminal.
# `reset` = 1 trims every earlier event (an admin requeue starts the query's story again after its end).
# An empty channel sends no notice (nobody can be waiting yet: see `append`'s `notify`); otherwise a terminal
# event sends one, any other only while a follower's mark stands.
_APPEND = """
local seq = redis.call('INCR', KEYS[2])
if seq == 1 and ARGV[1] ~= 'queued' and not (ARGV[1] == 'started' and ARGV[2] == '1') then
  -- A story starts with `queued` (or a first `started`: nothing is lost before it that a reader needs):
  -- this log was lost mid-story (Redis restarted without it). Number on from the clock (ms), so no
  -- reader's old position lines up with the new log: readers see the gap and fall back to the row.
  local t = redis.call('TIME')
  seq = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('SET', KEYS[2], seq)
end
local id = string.format('%d-0', seq)
redis.call('XADD', KEYS[1], id, 't', ARGV[1], 'a', ARGV[2], 'd', ARGV[3])
if ARGV[7] == '1' then redis.call('XTRIM', KEYS[1], 'MINID', id) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
if ARGV[5] ~= '' and (ARGV[8] == '1' or redis.call('EXISTS', KEYS[3]) == 1) then
  redis.call('PUBLISH', ARGV[5], ARGV[6] .. ' ' .. ARGV[1])
end
return seq
"""


def wake_channel(settings: Settings) -> str:
    """The channel of the wake-up notices."""
    return f"aiq:{settings.queue_name}:wake"


def parse_notice(message: bytes | str) -> tuple[str, str]:
    """A notice's query id and event type."""
    text = message.decode() if isinstance(message, bytes) else message
    query_id, _, type_ = text.partition(" ")
    return query_id, type_


class EventLog:
    """Append to and read a query's event log."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._redis = redis
        self._prefix = f"aiq:{settings.queue_name}:ev:"
        self._ttl = settings.event_log_ttl_seconds
        self._channel = wake_channel(settings)
        self._append = redis.register_script(_APPEND)

    def _key(self, query_id: uuid.UUID) -> str:
        return f"{self._prefix}{query_id}"

    def _call(
        self,
        query_id: uuid.UUID,
        type: EventType,
        data: dict[str, Any] | None,
        attempt: int | None,
        reset: bool,
        notify: bool = True,
    ) -> tuple[list[str], list[Any]]:
        key = self._key(query_id)
        args: list[Any] = [
            type.value,
            "" if attempt is None else str(attempt),
            orjson.dumps(data or {}),
            self._ttl,
            self._channel if notify else "",
            str(query_id),
            "1" if reset else "0",
            "1" if type in TERMINAL_EVENTS else "0",
        ]
        return [key, f"{key}:seq", f"{key}:follow"], args

    async def append(
        self,
        query_id: uuid.UUID,
        type: EventType,
        data: dict[str, Any] | None = None,
        attempt: int | None = None,
        *,
        reset: bool = False,
        notify: bool = True,
    ) -> int:
        """Append one event; returns its sequence number. Raises RedisError when Redis is unreachable.

        `notify=False` sends no wake-up notice: for a fresh query's `queued`, appended before its id is given
        out, nobody can be waiting, and every API process's subscriber would read the notice for nothing.
        """
        keys, args = self._call(query_id, type, data, attempt, reset, notify)
        seq = await self._append(keys=keys, args=args)
        EVENTS_PUBLISHED.labels(type=type.value).inc()
        return int(seq)

    def batch(self) -> ScriptBatch:
        """A batch on the log's Redis, for appends that ride in one round trip with other steps."""
        return ScriptBatch(self._redis)

    def append_in(
        self,
        batch: ScriptBatch,
        query_id: uuid.UUID,
        type: EventType,
        data: dict[str, Any],
        attempt: int | None,
        *,
        notify: bool = True,
    ) -> int:
        """`append` queued on a batch (shared with other features' scripts); the index of its result (the
        sequence number). Call `landed` once the batch has run."""
        keys, args = self._call(query_id, type, data, attempt, False, notify)
        return batch.add(self._append, keys, args)

    @staticmethod
    def landed(query_id: uuid.UUID, type: EventType, result: Any) -> None:
        """After a batch ran: count its event appended, or log it not appended (its result is an error)."""
        if isinstance(result, BaseException):
            log.warning(
                "event not appended", extra={"query_id": str(query_id), "outcome": type.value, "error": repr(result)}
            )
        else:
            EVENTS_PUBLISHED.labels(type=type.value).inc()

    async def append_quietly(
        self,
        query_id: uuid.UUID,
        type: EventType,
        data: dict[str, Any] | None = None,
        attempt: int | None = None,
        *,
        reset: bool = False,
        notify: bool = True,
    ) -> int | None:
        """`append`, but a Redis failure is logged and swallowed: the row is the truth, readers replay it."""
        try:
            return await self.append(query_id, type, data, attempt, reset=reset, notify=notify)
        except (RedisError, OSError) as exc:
            self.landed(query_id, type, exc)
            return None

    async def since(
        self, query_id: uuid.UUID, after: int, count: int | None = None, *, mark: bool = False
    ) -> list[Event]:
        """The events numbered above `after`, in order (empty when there are none or the log is gone).

        `mark`: (re)set the follow mark first, in the same round trip, so that every later event sends its notice
        for FOLLOW_MARK_SECONDS (module docstring)."""
        key = self._key(query_id)
        bound = f"({max(after, 0)}-0"
        raw: Any
        if mark:
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(f"{key}:follow", 1, ex=FOLLOW_MARK_SECONDS)
            pipe.xrange(key, min=bound, count=count)
            _, raw = await pipe.execute()
        else:
            raw = await self._redis.xrange(key, min=bound, count=count)
        entries: list[tuple[bytes, dict[bytes, bytes]]] = raw
        return [_event(entry_id, fields) for entry_id, fields in entries]

    async def last_seq(self, query_id: uuid.UUID) -> int:
        """The last sequence number given out (0: no log, never or no longer)."""
        value = await self._redis.get(f"{self._key(query_id)}:seq")
        return int(value) if value is not None else 0

    async def discard(self, *query_ids: uuid.UUID) -> None:
        """Forget queries' logs (their text is being erased); with Redis down they lapse with their TTL."""
        keys = [k for q in query_ids for k in (self._key(q), f"{self._key(q)}:seq", f"{self._key(q)}:follow")]
        try:
            for start in range(0, len(keys), 1000):
                await self._redis.delete(*keys[start : start + 1000])
        except (RedisError, OSError) as exc:
            log.warning("event log not discarded", extra={"count": len(query_ids), "error": type(exc).__name__})


def _event(entry_id: bytes | str, fields: dict[Any, Any]) -> Event:
    raw_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    values = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    attempt = values.get("a") or b""
    attempt_text = attempt.decode() if isinstance(attempt, bytes) else attempt
    type_ = values["t"].decode() if isinstance(values["t"], bytes) else values["t"]
    return Event(
        seq=int(raw_id.partition("-")[0]),
        type=EventType(type_),
        attempt=int(attempt_text) if attempt_text else None,
        data=orjson.loads(values.get("d") or b"{}"),
    )
