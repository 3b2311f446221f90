"""The upstream budget: one per (upstream, model), shared by every worker process and pod, held in Redis.

Each step is one Lua script, so check-and-take is atomic across processes (no read-then-write race):
- requests per minute and tokens per minute are token buckets (capacity = the per-minute limit, refilled
  continuously); a call reserves one request and its token estimate before it starts and settles the real
  usage after it ends (also after a failure, a cancel or a shutdown: nothing is reserved for ever);
- calls in flight are a sorted set of slots, each with its own expiry, so a SIGKILLed worker's slot frees
  itself after LLM_TIMEOUT_SECONDS;
- a 429 closes the budget until the provider's `retry-after` (waiters wake spread over a jitter window, so
  the reopening is not a stampede) and empties the bucket it names.

Limits come from `UPSTREAM_LIMITS` where configured, and are learned otherwise: every answer's
`x-ratelimit-limit-*` set the capacity, `x-ratelimit-remaining-*` pull the bucket down to what the provider
says is left. While nothing is known of a model (first start, or Redis lost its state) at most
UPSTREAM_PROBE_CONCURRENCY calls run at once, configured or not, until the first answer teaches the limits
and the provider's current level (an answer without the headers means "no advertised limit"). So a Redis
restart costs one round of probing, not a burst of 429s against a provider whose window is already spent.
The size of a bucket (the provider's burst) is learned from the reset headers: level + reset * rate.

A refusal says how long to wait, so a waiter sleeps exactly that long (no polling storm). A waiters marker
per model makes new deliveries queue behind the waiting work instead of jumping it (see worker/dispatcher.py).

Keys, under `aiq:{QUEUE_NAME}:up:{sha(upstream)}:{model}:` — `rq`/`tk` (bucket level and time), `fly`
(slots), `closed` (until, as a TTL), `learn` (learned limits), `wait` (waiters marker).
Time is Redis' own clock, so workers with skewed clocks agree.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.config import Settings
from shared.limits import prompt_chars
from shared.llm import RateLimitInfo
from shared.metrics import UPSTREAM_BUDGET_LEVEL, UPSTREAM_THROTTLED
from shared.scriptbatch import ScriptBatch

log = logging.getLogger(__name__)

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- A bucket of `cap` refilled at `limit` per minute; missing, it starts full.
local function level(key, cap, limit)
  local v = redis.call('HMGET', key, 'l', 't')
  if not v[1] then return cap end
  return math.min(cap, tonumber(v[1]) + (now - tonumber(v[2])) * limit / 60000)
end
local function put(key, l)
  redis.call('HSET', key, 'l', tostring(l), 't', now)
  redis.call('PEXPIRE', key, 120000)
end
-- Configured limits win (-1: learn); the burst a bucket holds is learned from the reset headers, else a minute.
local function limits(cfg_rpm, cfg_tpm, cfg_conc)
  local L = redis.call('HMGET', KEYS[5], 'rpm', 'tpm', 'conc', 'seen', 'rcap', 'tcap')
  local rpm, tpm, conc = cfg_rpm, cfg_tpm, cfg_conc
  if rpm < 0 then rpm = tonumber(L[1] or '0') end
  if tpm < 0 then tpm = tonumber(L[2] or '0') end
  if conc < 0 then conc = tonumber(L[3] or '0') end
  local rcap, tcap = math.min(rpm, tonumber(L[5] or rpm)), math.min(tpm, tonumber(L[6] or tpm))
  return rpm, tpm, conc, L[4], math.max(1, rcap), math.max(1, tcap)
end
"""

# KEYS: rq, tk, fly, closed, learn, wait. ARGV: cfg rpm, tpm, conc (-1: learn), tokens, slot, slot ttl ms,
# probe concurrency, fresh (1: a new delivery, which must not jump waiting work), dry (1: only look).
# Returns {granted, wait_ms, reason, reserved_tokens, slot_taken, rpm_left, tpm_left, known}.
# Reasons: 0 ok, 1 closed after a 429, 2 requests, 3 tokens, 4 concurrency, 5 others are waiting.
_ACQUIRE = (
    _PRELUDE
    + """
local rpm, tpm, conc, known, rcap, tcap = limits(tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
local tokens, fresh = tonumber(ARGV[4]), ARGV[8] == '1'
if fresh and redis.call('EXISTS', KEYS[6]) == 1 then return {0, 0, 5, 0, 0, -1, -1, 1} end
local closed = redis.call('PTTL', KEYS[4])
if closed > 0 then return {0, closed, 1, 0, 0, 0, 0, 1} end
if known then
  -- What was learned lasts while the model is in use (the idle path never settles).
  redis.call('PEXPIRE', KEYS[5], 604800000)
else
  conc = tonumber(ARGV[7])
end
local n = 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  n = redis.call('ZCARD', KEYS[3])
  -- A slot frees when a call ends (no time is known): wait briefly and look again.
  if n >= conc then return {0, 50, 4, 0, 0, -1, -1, 1} end
end
local lr, lt = -1, -1
if rpm > 0 then
  lr = level(KEYS[1], rcap, rpm)
  if lr < 1 then return {0, math.ceil((1 - lr) * 60000 / rpm), 2, 0, 0, 0, -1, 1} end
end
if tpm > 0 then
  -- A call larger than the whole bucket waits for a full bucket, not for ever.
  if tokens > tcap then tokens = tcap end
  lt = level(KEYS[2], tcap, tpm)
  if lt < tokens then return {0, math.ceil((tokens - lt) * 60000 / tpm), 3, 0, 0, math.floor(lr), math.floor(lt), 1} end
else
  tokens = 0
end
local k = 0
if known then k = 1 end
if ARGV[9] == '1' then return {1, 0, 0, 0, 0, math.floor(lr), math.floor(lt), k} end
if rpm > 0 then lr = lr - 1; put(KEYS[1], lr) end
if tpm > 0 then lt = lt - tokens; put(KEYS[2], lt) end
local slot = 0
if conc > 0 then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[5])
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[6]) + 60000)
  slot = 1
end
return {1, 0, 0, tokens, slot, math.floor(lr), math.floor(lt), k}
"""
)

# KEYS: rq, tk, fly, closed, learn. ARGV: slot, reserved, used (-1: unknown, keep the reservation),
# throttled retry ms (-1: not a 429), throttled kind (requests|tokens|''), learned limit rpm, tpm,
# remaining requests, tokens (-1: not sent), answered (1: a provider answer, headers or not), cfg rpm, tpm, conc,
# reset requests, tokens in ms (-1: not sent), ms since the call started.
_SETTLE = (
    _PRELUDE
    + """
redis.call('ZREM', KEYS[3], ARGV[1])
local reserved, used, throttled = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lim_rpm, lim_tpm, rem_rq, rem_tk = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local reset_rq, reset_tk, elapsed = tonumber(ARGV[14]), tonumber(ARGV[15]), tonumber(ARGV[16])
if ARGV[10] == '1' then
  if lim_rpm > 0 then redis.call('HSET', KEYS[5], 'rpm', lim_rpm) end
  if lim_tpm > 0 then redis.call('HSET', KEYS[5], 'tpm', lim_tpm) end
  -- A bucket's level plus what refills until it is full is its size: the provider's burst.
  if lim_rpm > 0 and rem_rq >= 0 and reset_rq >= 0 then
    redis.call('HSET', KEYS[5], 'rcap', math.floor(rem_rq + reset_rq * lim_rpm / 60000))
  end
  if lim_tpm > 0 and rem_tk >= 0 and reset_tk >= 0 then
    redis.call('HSET', KEYS[5], 'tcap', math.floor(rem_tk + reset_tk * lim_tpm / 60000))
  end
  redis.call('HSET', KEYS[5], 'seen', 1)
  redis.call('PEXPIRE', KEYS[5], 604800000)
end
local rpm, tpm, _, _, rcap, tcap = limits(tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13]))
if tpm > 0 then
  local lt = level(KEYS[2], tcap, tpm)
  if reserved > 0 and used >= 0 then lt = math.min(tcap, lt + reserved - used) end
  -- `remaining` was counted when the call arrived: what refilled since is the provider's too.
  if rem_tk >= 0 then
    local now_left = rem_tk + elapsed * tpm / 60000
    if now_left < lt then lt = now_left end
  end
  if throttled >= 0 and ARGV[5] == 'tokens' then lt = 0 end
  put(KEYS[2], lt)
end
if rpm > 0 then
  local lr = level(KEYS[1], rcap, rpm)
  if rem_rq >= 0 then
    local now_left = rem_rq + elapsed * rpm / 60000
    if now_left < lr then lr = now_left end
  end
  if throttled >= 0 and ARGV[5] ~= 'tokens' then lr = 0 end
  put(KEYS[1], lr)
end
if throttled > 0 then
  local left = redis.call('PTTL', KEYS[4])
  if left < throttled then redis.call('SET', KEYS[4], 1, 'PX', throttled) end
end
return 1
"""
)


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """Configured limits of one model; None: learned from the provider."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None

    def args(self) -> list[int]:
        return [-1 if v is None else v for v in (self.rpm, self.tpm, self.concurrency)]


@dataclass(frozen=True, slots=True)
class Grant:
    """Budget taken for one call; settle it exactly once when the call ends."""

    model: str
    # The in-flight slot ("" when no concurrency limit applies).
    slot: str
    reserved_tokens: int
    # Nothing is known of the model's limits yet: the answer must be read to learn them.
    learning: bool = False
    # Redis was unreachable: nothing was taken, nothing to settle.
    offline: bool = False
    taken_at: float = field(default_factory=time.monotonic)

    def needs_settle(self, ratelimit: RateLimitInfo | None = None) -> bool:
        """Whether settling does anything; the idle path (nothing to hold, nothing to learn) skips it."""
        if self.offline:
            return False
        return bool(self.slot or self.reserved_tokens or self.learning or ratelimit is not None)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Not now: come back after `wait_seconds` (jitter already added)."""

    wait_seconds: float
    reason: str


REASONS = {1: "closed", 2: "requests", 3: "tokens", 4: "concurrency", 5: "queued"}


def jittered(wait_ms: float, rng: random.Random | None = None, *, reopening: bool = True) -> float:
    """A refusal's wait in seconds, spread so that waiters do not all wake in the same millisecond: widely
    when the budget reopens after a 429 (no stampede), narrowly for a bucket's next token."""
    spread = min(1000.0, 20.0 + wait_ms * 0.25) if reopening else 5.0 + wait_ms * 0.05
    uniform = rng.uniform if rng is not None else random.uniform
    return (wait_ms + uniform(0, spread)) / 1000


class UpstreamBudget:
    """The scripts, registered once per process, and the limits each model runs under."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._settings = settings
        upstream = settings.openai_base_url or "https://api.openai.com/v1"
        self._prefix = f"aiq:{settings.queue_name}:up:{hashlib.sha256(upstream.encode()).hexdigest()[:12]}:"
        self._configured = {
            model: ModelLimits(limits.get("rpm"), limits.get("tpm"), limits.get("concurrency"))
            for model, limits in settings.upstream_limits.items()
        }
        self._acquire = redis.register_script(_ACQUIRE)
        self._settle = redis.register_script(_SETTLE)
        self._redis = redis
        # A slot outlives the longest call it can stand for.
        self._slot_ttl_ms = math.ceil((settings.llm_timeout_seconds + 5) * 1000)

    def limits_for(self, model: str) -> ModelLimits:
        return self._configured.get(model) or self._configured.get("*") or ModelLimits()

    def keys(self, model: str) -> list[str]:
        base = f"{self._prefix}{model}:"
        return [f"{base}rq", f"{base}tk", f"{base}fly", f"{base}closed", f"{base}learn", f"{base}wait"]

    def estimate(
        self, prompt: str, system: str | None, history: Sequence[Mapping[str, str]] | None, max_tokens: int | None
    ) -> int:
        """What a call reserves of a tokens-per-minute budget: the prompt (with the conversation before it) at
        ~4 characters a token plus the answer's cap (UPSTREAM_OUTPUT_ESTIMATE when the query sets none); settled
        with the real usage."""
        return math.ceil(prompt_chars(prompt, system, history) / 4) + (
            max_tokens or self._settings.upstream_output_estimate
        )

    async def acquire(self, model: str, tokens: int, *, fresh: bool = False, dry: bool = False) -> Grant | Refusal:
        """Take one call's budget, or say how long to wait. Redis down: the call goes ahead (fail open,
        logged): the queue must keep working, and a provider's 429s still pace it through the retries.

        `dry` only looks (nothing is taken, the Grant holds nothing): a dispatcher asks before it claims a row.
        """
        slot = uuid.uuid4().hex
        args: list[Any] = [*self.limits_for(model).args(), tokens, slot, self._slot_ttl_ms]
        args += [self._settings.upstream_probe_concurrency, int(fresh), int(dry)]
        try:
            reply = [int(v) for v in await self._acquire(keys=self.keys(model), args=args)]
        except RedisError as exc:
            log.warning("upstream budget unavailable; calling without it", extra={"error": type(exc).__name__})
            return Grant(model, "", 0, offline=True)
        granted, wait_ms, reason, reserved, slot_taken, rpm_left, tpm_left, known = reply
        if rpm_left >= 0:
            UPSTREAM_BUDGET_LEVEL.labels(model=model, kind="requests").set(rpm_left)
        if tpm_left >= 0:
            UPSTREAM_BUDGET_LEVEL.labels(model=model, kind="tokens").set(tpm_left)
        if granted:
            if dry:
                return Grant(model, "", 0, offline=True)
            return Grant(model, slot if slot_taken else "", reserved, learning=not known)
        return Refusal(0.0 if reason == 5 else jittered(wait_ms, reopening=reason == 1), REASONS.get(reason, "other"))

    async def settle(
        self,
        grant: Grant,
        *,
        used_tokens: int | None,
        ratelimit: RateLimitInfo | None = None,
        answered: bool = False,
        throttled_after: float | None = None,
        throttled_kind: str | None = None,
    ) -> None:
        """End a call's hold: free its slot, refund what it reserved beyond `used_tokens` (None: unknown, the
        reservation stands), learn the limits the provider advertised, and on a 429 close the budget for
        `throttled_after` seconds. Never raises: a lost settle is repaired by the buckets' refill."""
        if grant.offline:
            return
        args = self._settle_args(grant, used_tokens, ratelimit, answered, throttled_after, throttled_kind)
        try:
            await self._settle(keys=self.keys(grant.model)[:5], args=args)
        except RedisError as exc:
            log.warning("upstream budget settle skipped", extra={"error": type(exc).__name__})

    def settle_in(
        self,
        batch: ScriptBatch,
        grant: Grant,
        *,
        used_tokens: int | None,
        ratelimit: RateLimitInfo | None = None,
        answered: bool = False,
    ) -> int | None:
        """`settle` queued on a batch (a query's end: one round trip with the rest); the index of its result,
        None when there is nothing to settle. A failed batch is repaired like a lost settle."""
        if grant.offline:
            return None
        args = self._settle_args(grant, used_tokens, ratelimit, answered, None, None)
        return batch.add(self._settle, self.keys(grant.model)[:5], args)

    def _settle_args(
        self,
        grant: Grant,
        used_tokens: int | None,
        ratelimit: RateLimitInfo | None,
        answered: bool,
        throttled_after: float | None,
        throttled_kind: str | None,
    ) -> list[Any]:
        info = ratelimit or RateLimitInfo()
        if throttled_after is not None:
            UPSTREAM_THROTTLED.labels(model=grant.model).inc()
        return [
            grant.slot or "-",
            grant.reserved_tokens,
            -1 if used_tokens is None else used_tokens,
            -1 if throttled_after is None else math.ceil(throttled_after * 1000),
            throttled_kind or "",
            info.limit_requests or 0,
            info.limit_tokens or 0,
            -1 if info.remaining_requests is None else info.remaining_requests,
            -1 if info.remaining_tokens is None else info.remaining_tokens,
            int(answered),
            *self.limits_for(grant.model).args(),
            -1 if info.reset_requests is None else math.ceil(info.reset_requests * 1000),
            -1 if info.reset_tokens is None else math.ceil(info.reset_tokens * 1000),
            max(0, math.floor((time.monotonic() - grant.taken_at) * 1000)),
        ]

    async def mark_waiting(self, model: str, ttl_seconds: float) -> None:
        """Say that work for this model is waiting: new deliveries queue behind it until the marker lapses."""
        try:
            await self._redis.set(self.keys(model)[5], 1, px=max(1, math.ceil(ttl_seconds * 1000)))
        except RedisError as exc:
            log.warning("waiters marker not set", extra={"error": type(exc).__name__})

    async def waiting(self, models: Collection[str]) -> set[str]:
        """Which of these models have work waiting (their marker stands): a dispatcher claims their due rows in
        fair order, so they need no message. Redis unreachable: none (the caller acts as if nobody waited)."""
        names = sorted(models)
        if not names:
            return set()
        try:
            marks = await self._redis.mget([self.keys(model)[5] for model in names])
        except RedisError as exc:
            log.warning("waiters markers not read", extra={"error": type(exc).__name__})
            return set()
        return {model for model, mark in zip(names, marks, strict=True) if mark is not None}

    async def clear_waiting(self, model: str) -> None:
        try:
            await self._redis.delete(self.keys(model)[5])
        except RedisError as exc:
            log.warning("waiters marker not cleared", extra={"error": type(exc).__name__})
