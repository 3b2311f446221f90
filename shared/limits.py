"""Limits and throttles in Redis: per-user submit limits and the login/registration throttles.

One concept: each check is one Lua script, so check-and-take is atomic across every API process (one
round trip, EVALSHA); a refusal is one `LimitExceeded` (429, `Retry-After`, the IETF draft
`RateLimit-Policy`/`RateLimit` fields of draft-ietf-httpapi-ratelimit-headers, a code naming the limit).
Redis keeps only counters; the rows stay the truth for usage. Time is Redis' own clock (`TIME`), so API
processes with skewed clocks agree. The scripts name keys they build themselves: standalone Redis only.

Keys, under `aiq:{QUEUE_NAME}:lim:`:
- `rpm:{user}`: GCRA theoretical arrival time (ms): a burst of N, then one every 60/N s.
- `pending:{user}`: ZSET of the user's unfinished query ids, scored by submit time.
- `tok:{user}:{n}`: tokens held in token window number n (fixed windows of LIMIT_TOKEN_WINDOW_SECONDS).
- `res:{query}`: the reservation of one query until it is settled (its existence makes settling idempotent).
- `login:pair:{acct}:{addr}`, `login:acct:{acct}`, `login:addr:{addr}`: failure counters; `reg:{addr}`: GCRA.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.config import Settings
from shared.db import per_redis_client
from shared.errors import AppError
from shared.metrics import LIMIT_REFUSALS
from shared.revocation import GUARD_LUA, CheckNeeded, Guard
from shared.scriptbatch import ScriptBatch

log = logging.getLogger(__name__)

# Shared by the scripts: now in ms from Redis' clock, and a GCRA step on one key.
_LUA_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function gcra(key, limit, period_ms, take)
  local interval = period_ms / limit
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - period_ms
  if allow_at > now then return false, allow_at - now, 0, tat - now end
  if take then redis.call('SET', key, tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000) end
  return true, 0, math.floor((period_ms - (new_tat - now)) / interval), new_tat - now
end
"""

# KEYS: rpm, pending, reservation, token-window key base, then optionally a revocation guard's keys (the caller's
# state and markers, shared/revocation.py). ARGV: rpm, max_pending, budget, window_s, tokens, query_id, user_id,
# force, then the guard's issued-at. Returns {refused (0 ok | 1 rpm | 2 pending | 3 tokens | 4 guard unsure),
# retry_ms, rpm_left, rpm_reset_ms, pending_left, tokens_left, tokens_reset_ms}. An unsure guard takes nothing.
_SUBMIT = (
    _LUA_PRELUDE
    + GUARD_LUA
    + """
if #KEYS > 4 and not revocation_clear(5, #KEYS, tonumber(ARGV[9])) then return {4, 0, -1, 0, -1, -1, 0} end
local rpm, maxp, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local window_ms, tokens, force = tonumber(ARGV[4]) * 1000, tonumber(ARGV[5]), ARGV[8] == '1'
local win = math.floor(now / window_ms)
local tok_key = KEYS[4] .. win
local tok_reset = (win + 1) * window_ms - now
local rpm_left, rpm_reset = -1, 0
if rpm > 0 then
  local ok, retry, left, reset = gcra(KEYS[1], rpm, 60000, false)
  if not ok and not force then return {1, retry, 0, reset, -1, -1, tok_reset} end
  rpm_left, rpm_reset = left, reset
end
-- A query unfinished after a whole token window was lost to a failure that skipped its settle.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window_ms)
local pending = redis.call('ZCARD', KEYS[2])
if maxp > 0 and pending >= maxp and not force then return {2, 2000, rpm_left, rpm_reset, 0, -1, tok_reset} end
local held = tonumber(redis.call('GET', tok_key) or '0')
if budget > 0 and held + tokens > budget and not force then
  return {3, tok_reset, rpm_left, rpm_reset, maxp - pending, budget - held, tok_reset}
end
if rpm > 0 then gcra(KEYS[1], rpm, 60000, true) end
redis.call('ZADD', KEYS[2], now, ARGV[6])
redis.call('PEXPIRE', KEYS[2], window_ms * 2)
redis.call('INCRBY', tok_key, tokens)
redis.call('PEXPIRE', tok_key, tok_reset + 60000)
redis.call('HSET', KEYS[3], 'pending', KEYS[2], 'tok', tok_key, 'tokens', tokens, 'q', ARGV[6], 'u', ARGV[7])
redis.call('PEXPIRE', KEYS[3], window_ms * 2)
return {0, 0, rpm_left, rpm_reset, maxp - pending - 1, budget - held - tokens, tok_reset}
"""
)

# KEYS: reservation. ARGV: tokens used. 1 if this call settled it, 0 if it was settled before (or never held).
_SETTLE = """
local r = redis.call('HMGET', KEYS[1], 'pending', 'tok', 'tokens', 'q')
if not r[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', r[1], r[4])
if redis.call('EXISTS', r[2]) == 1 then redis.call('INCRBY', r[2], tonumber(ARGV[1]) - tonumber(r[3])) end
return 1
"""

# KEYS: failure counters. ARGV: window_s, max_lock_s, then one threshold per key.
# Refuses (returns the wait in ms) while any counter at or over its threshold is locked out: 2 s after the
# threshold-th failure, doubling with each further one, up to max_lock_s. Otherwise counts this attempt as
# a failure in every counter (taken up front, so parallel guesses cannot slip through) and returns 0.
_LOGIN_TAKE = (
    _LUA_PRELUDE
    + """
local window_ms, max_lock_ms = tonumber(ARGV[1]) * 1000, tonumber(ARGV[2]) * 1000
local wait = 0
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 'n', 'last')
  local n, last, threshold = tonumber(v[1] or '0'), tonumber(v[2] or '0'), tonumber(ARGV[i + 2])
  if n >= threshold then
    local lock = math.min(2000 * 2 ^ (n - threshold), max_lock_ms)
    if last + lock > now then wait = math.max(wait, last + lock - now) end
  end
end
if wait > 0 then return wait end
for _, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, 'n', 1)
  redis.call('HSET', key, 'last', now)
  redis.call('PEXPIRE', key, window_ms + max_lock_ms)
end
return 0
"""
)

# KEYS[1]: the (account, address) counter, cleared; the others: the failure taken up front is given back.
_LOGIN_SUCCESS = """
redis.call('DEL', KEYS[1])
for i = 2, #KEYS do
  if tonumber(redis.call('HGET', KEYS[i], 'n') or '0') > 0 then redis.call('HINCRBY', KEYS[i], 'n', -1) end
end
return 1
"""

# KEYS[1]: a user's rpm key. ARGV: rpm. Takes only the per-minute limit (a submit answered from the response
# cache holds no pending slot and no tokens). Returns {refused (0|1), retry_ms, rpm_left, rpm_reset_ms}.
_REQUEST = (
    _LUA_PRELUDE
    + """
local ok, retry, left, reset = gcra(KEYS[1], tonumber(ARGV[1]), 60000, true)
if ok then return {0, 0, left, math.ceil(reset)} end
return {1, math.ceil(retry), 0, math.ceil(reset)}
"""
)

# KEYS[1]: a GCRA key. ARGV: limit, period_s. Returns the wait in ms (0: taken).
_RATE = (
    _LUA_PRELUDE
    + """
local ok, retry = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]) * 1000, true)
if ok then return 0 end
return math.max(1, math.ceil(retry))
"""
)


# KEYS[1]: the user's open streams (ZSET of slot ids scored by lease expiry, ms). ARGV: cap, lease_ms, slot,
# take (1: take a slot within the cap, 0: renew one held). Returns the wait in ms (0: taken or renewed).
# Leases lapse on their own, so an API process that dies with streams open leaks no slot for long.
_STREAM_SLOT = (
    _LUA_PRELUDE
    + """
local cap, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[4] == '1' and redis.call('ZCARD', KEYS[1]) >= cap then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1000, tonumber(first[2]) - now)
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[1], lease)
return 0
"""
)


class LimitExceeded(AppError):
    """429 for any limit or throttle; the code names it, the headers say when to come back."""

    status_code = 429

    def __init__(self, code: str, message: str, retry_after_ms: float, headers: dict[str, str] | None = None) -> None:
        retry = str(max(1, math.ceil(retry_after_ms / 1000)))
        super().__init__(message, code=code, headers={**(headers or {}), "Retry-After": retry})
        LIMIT_REFUSALS.labels(limit=code).inc()


def limits_unavailable() -> AppError:
    """Redis is down: limits cannot be checked, so the request is refused (fail closed)."""
    return AppError(
        "Limits cannot be checked right now; retry shortly",
        status_code=503,
        code="limits_unavailable",
        headers={"Retry-After": "2"},
    )


@dataclass(frozen=True, slots=True)
class Limits:
    """One user's effective submit limits; 0 switches one off."""

    requests_per_minute: int
    max_pending: int
    token_budget: int
    token_window_seconds: int

    @classmethod
    def defaults(cls, settings: Settings) -> Limits:
        return cls(
            settings.limit_requests_per_minute,
            settings.limit_max_pending,
            settings.limit_token_budget,
            settings.limit_token_window_seconds,
        )

    def policy_header(self) -> str:
        """`RateLimit-Policy`: a Structured Fields list of the limits that are on."""
        items = []
        if self.requests_per_minute:
            items.append(f'"rpm";q={self.requests_per_minute};w=60')
        if self.max_pending:
            items.append(f'"pending";q={self.max_pending};qu="concurrent-requests"')
        if self.token_budget:
            items.append(f'"tokens";q={self.token_budget};w={self.token_window_seconds};qu="tokens"')
        return ", ".join(items)


def prompt_chars(prompt: str, system: str | None, history: Sequence[Mapping[str, str]] | None) -> int:
    """The characters the model reads: the prompt, the system prompt and a conversation's earlier turns."""
    return len(prompt) + len(system or "") + sum(len(turn["content"]) for turn in history or ())


def estimate_tokens(
    query: str,
    system: str | None,
    history: Sequence[Mapping[str, str]] | None,
    max_tokens: int | None,
    settings: Settings,
) -> int:
    """What a submit reserves: the prompt (with the conversation before it) at ~4 characters a token, plus the
    output cap it may use."""
    return math.ceil(prompt_chars(query, system, history) / 4) + (max_tokens or settings.max_output_tokens)


def _status_header(
    limits: Limits, rpm_left: int, rpm_reset_ms: float, pending_left: int, tokens_left: int, tokens_reset_ms: float
) -> str:
    """`RateLimit`: what is left of each policy and when it is back (seconds)."""
    items = []
    if limits.requests_per_minute:
        items.append(f'"rpm";r={max(0, rpm_left)};t={math.ceil(max(0, rpm_reset_ms) / 1000)}')
    if limits.max_pending:
        items.append(f'"pending";r={max(0, pending_left)}')
    if limits.token_budget:
        items.append(f'"tokens";r={max(0, tokens_left)};t={math.ceil(max(0, tokens_reset_ms) / 1000)}')
    return ", ".join(items)


_REFUSALS = {
    1: ("rate_limited", "Too many requests per minute"),
    2: ("too_many_pending", "Too many queries pending or running; wait for some to finish"),
    3: ("token_budget_exceeded", "This query's token reservation would exceed your token budget"),
}


def _sha(value: str) -> str:
    # Emails never appear in Redis key names in clear.
    return hashlib.sha256(value.encode()).hexdigest()[:32]


class Limiter:
    """The scripts, registered once per process on its Redis client."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._settings = settings
        self._redis = redis
        self._prefix = f"aiq:{settings.queue_name}:lim:"
        self._submit = redis.register_script(_SUBMIT)
        self._settle = redis.register_script(_SETTLE)
        self._login_take = redis.register_script(_LOGIN_TAKE)
        self._login_success = redis.register_script(_LOGIN_SUCCESS)
        self._rate = redis.register_script(_RATE)
        self._request = redis.register_script(_REQUEST)
        self._stream_slot = redis.register_script(_STREAM_SLOT)

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except RedisError as exc:
            log.warning("limits unavailable", extra={"error": type(exc).__name__})
            raise limits_unavailable() from exc

    async def take_submit(
        self,
        user_id: uuid.UUID,
        query_id: uuid.UUID,
        limits: Limits,
        tokens: int,
        *,
        force: bool = False,
        guard: Guard | None = None,
    ) -> dict[str, str]:
        """Check and take all three limits at once; the `RateLimit` headers, or `LimitExceeded`.

        `force` takes without checking (an admin's requeue), so the settle still books the real usage.
        `guard` checks the caller's revocation state in the same round trip and takes nothing unless it clears
        them (`CheckNeeded` otherwise: run the full check, then take without a guard).
        """
        if not (limits.requests_per_minute or limits.max_pending or limits.token_budget or force):
            if guard is not None:
                raise CheckNeeded
            # Every limit off for this user: no Redis round trip, nothing to settle later.
            return {}
        p, u = self._prefix, str(user_id)
        keys = [f"{p}rpm:{u}", f"{p}pending:{u}", f"{p}res:{query_id}", f"{p}tok:{u}:"]
        args: list[Any] = [
            limits.requests_per_minute,
            limits.max_pending,
            limits.token_budget,
            limits.token_window_seconds,
            tokens,
            str(query_id),
            u,
            int(force),
        ]
        if guard is not None:
            keys += guard.keys
            args.append(repr(guard.issued_at))
        refused, retry_ms, rpm_left, rpm_reset, pending_left, tokens_left, tokens_reset = (
            int(v) for v in await self._run(self._submit, keys, args)
        )
        if refused == 4:
            raise CheckNeeded
        headers = {"RateLimit": _status_header(limits, rpm_left, rpm_reset, pending_left, tokens_left, tokens_reset)}
        if policy := limits.policy_header():
            headers["RateLimit-Policy"] = policy
        if not headers["RateLimit"]:
            del headers["RateLimit"]
        if refused:
            code, message = _REFUSALS[refused]
            raise LimitExceeded(code, message, retry_ms, headers)
        return headers

    async def take_request(self, user_id: uuid.UUID, limits: Limits) -> dict[str, str]:
        """Take only the requests-per-minute limit (a submit answered from the response cache); the
        `RateLimit` headers, or `LimitExceeded`. Nothing is reserved, so there is nothing to settle."""
        headers = {"RateLimit-Policy": policy} if (policy := limits.policy_header()) else {}
        if not limits.requests_per_minute:
            return headers
        refused, retry_ms, rpm_left, rpm_reset = (
            int(v)
            for v in await self._run(self._request, [f"{self._prefix}rpm:{user_id}"], [limits.requests_per_minute])
        )
        headers["RateLimit"] = f'"rpm";r={max(0, rpm_left)};t={math.ceil(max(0, rpm_reset) / 1000)}'
        if refused:
            code, message = _REFUSALS[1]
            raise LimitExceeded(code, message, retry_ms, headers)
        return headers

    async def settle(self, query_id: uuid.UUID, used_tokens: int) -> bool:
        """Book a finished query's real usage and release the rest; True only for the call that settled it."""
        return bool(await self._run(self._settle, [f"{self._prefix}res:{query_id}"], [max(0, used_tokens)]))

    def settle_in(self, batch: ScriptBatch, query_id: uuid.UUID, used_tokens: int) -> int:
        """`settle` queued on a batch (shared with other features' scripts); the index of its result."""
        return batch.add(self._settle, [f"{self._prefix}res:{query_id}"], [max(0, used_tokens)])

    async def settle_quietly(self, query_id: uuid.UUID, used_tokens: int) -> None:
        """`settle` where a terminal write already happened: Redis down is logged, not raised. The
        reservation then lapses with its token window, and the pending slot with the safety net of the
        submit script (entries older than a window are dropped)."""
        try:
            await self.settle(query_id, used_tokens)
        except AppError:
            log.warning("settle skipped: limits unavailable", extra={"query_id": str(query_id)})

    def _login_keys(self, email: str, address: str) -> list[str]:
        p, acct = self._prefix, _sha(email)
        return [f"{p}login:pair:{acct}:{address}", f"{p}login:acct:{acct}", f"{p}login:addr:{address}"]

    async def login_attempt(self, email: str, address: str) -> None:
        """Before checking a password: 429 while the account or the address is locked out, else count it."""
        s = self._settings
        thresholds = [s.login_max_failures, s.login_max_failures * 2, s.login_address_max_failures]
        wait = int(
            await self._run(
                self._login_take,
                self._login_keys(email, address),
                [s.login_failure_window_seconds, s.login_lockout_max_seconds, *thresholds],
            )
        )
        if wait:
            raise LimitExceeded("login_throttled", "Too many failed logins; wait before trying again", wait)

    async def login_succeeded(self, email: str, address: str) -> None:
        """A correct password clears this address's count for the account, and only that one."""
        await self._run(self._login_success, self._login_keys(email, address), [])

    async def register_attempt(self, address: str) -> None:
        """Registrations per client address: REGISTER_PER_HOUR, as a burst then evenly spaced."""
        limit = self._settings.register_per_hour
        if not limit:
            return
        wait = int(await self._run(self._rate, [f"{self._prefix}reg:{address}"], [limit, 3600]))
        if wait:
            raise LimitExceeded("register_throttled", "Too many registrations from this address", wait)

    def _streams_key(self, user_id: uuid.UUID) -> str:
        return f"{self._prefix}streams:{user_id}"

    async def take_stream(self, user_id: uuid.UUID, slot: str, lease_seconds: float) -> None:
        """One of the user's MAX_STREAMS_PER_USER open event streams, leased; `LimitExceeded` over the cap."""
        cap = self._settings.max_streams_per_user
        if not cap:
            return
        lease_ms = math.ceil(lease_seconds * 1000)
        wait = int(await self._run(self._stream_slot, [self._streams_key(user_id)], [cap, lease_ms, slot, 1]))
        if wait:
            raise LimitExceeded("too_many_streams", f"At most {cap} event streams may be open at once", wait)

    async def renew_stream(self, user_id: uuid.UUID, slot: str, lease_seconds: float) -> None:
        """Extend a held stream slot's lease (a failure is logged: the slot then lapses, the stream goes on)."""
        if not self._settings.max_streams_per_user:
            return
        try:
            await self._stream_slot(
                keys=[self._streams_key(user_id)], args=[0, math.ceil(lease_seconds * 1000), slot, 0]
            )
        except RedisError as exc:
            log.warning("stream slot not renewed", extra={"error": type(exc).__name__})

    async def release_stream(self, user_id: uuid.UUID, slot: str) -> None:
        """Give a stream slot back (quietly: an unreleased slot lapses with its lease)."""
        if not self._settings.max_streams_per_user:
            return
        try:
            await self._redis.zrem(self._streams_key(user_id), slot)
        except RedisError as exc:
            log.warning("stream slot not released", extra={"error": type(exc).__name__})


def client_address(peer: str | None, forwarded_for: str | None, trusted: list[str]) -> str:
    """The client's address: the TCP peer, or, when the peer is a trusted proxy, the nearest untrusted hop
    of `X-Forwarded-For` (read from the right: everything left of an untrusted hop may be forged)."""
    networks = [ipaddress.ip_network(cidr, strict=False) for cidr in trusted]

    def is_trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in networks)

    address = peer or "unknown"
    if not forwarded_for or not is_trusted(address):
        return address
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return address
        address = hop
        if not is_trusted(hop):
            break
    return address


# The process's Limiter on a Redis client: its scripts are registered once, not per request.
limiter_for = per_redis_client(Limiter)
