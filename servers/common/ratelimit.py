"""Rate limits, kept in Redis when configured, in memory otherwise or while Redis fails.

Two algorithms (DESIGN.md, Limits), with one interface (``hit(key) -> Verdict``):

- ``SlidingWindowLimiter``: at most ``limit`` hits in any ``window`` seconds, exactly; it keeps
  every hit of the window, so it suits small limits (the login limits).
- ``TokenBucketLimiter``: a bucket of ``limit`` tokens that refills at ``limit / window`` a
  second (the generic cell rate algorithm: one stored moment per key, whatever the limit). It
  lets a burst of ``limit`` through, then one call per ``window / limit`` seconds; it suits
  large limits (the request quotas), whose sliding windows would keep thousands of hits a key.

With Redis, replicas share one count (an atomic server-side script per hit). When Redis does not
answer, a limiter falls back to its own memory at once and tries Redis again after a pause, so a
Redis outage neither blocks callers nor lifts the limits.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from .tracing import redis_span

log = logging.getLogger("agentmesh.ratelimit")

REDIS_RETRY_SECONDS = 5.0

# Reply numbers go back as strings: Redis turns a Lua number into an integer.
_SLIDING_WINDOW = """
local key, now, window, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
if count < limit then
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('PEXPIRE', key, math.ceil(window * 1000))
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
local frees = tostring(tonumber(oldest[2]) + window)
if count < limit then
  return {1, limit - count - 1, '0', frees}
end
return {0, 0, tostring(tonumber(oldest[2]) + window - now), frees}
"""

# The key holds the bucket's "theoretical arrival time": the moment it will be full again.
# ARGV[5] is SLACK (see below).
_TOKEN_BUCKET = """
local key, now, window, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local full = math.max(tonumber(redis.call('GET', key) or '0'), now)
local after = full + window / limit
if after - window > now + tonumber(ARGV[5]) then
  return {0, string.format('%.17g', full)}
end
local text = string.format('%.17g', after)
redis.call('SET', key, text, 'PX', math.ceil((after - now) * 1000))
return {1, text}
"""
# Takes ARGV[4] tokens whatever the bucket holds: a cost known only after the call (a scan's
# length). The moment the bucket is full again moves past the window: the debt, which refuses
# the key's next calls until it is paid back.
_TOKEN_BUCKET_SPEND = """
local key, now, window, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local full = math.max(tonumber(redis.call('GET', key) or '0'), now)
local after = full + tonumber(ARGV[4]) * window / limit
redis.call('SET', key, string.format('%.17g', after), 'PX', math.ceil((after - now) * 1000))
return 1
"""
# Sums of intervals carry rounding errors: the last call of a burst could find the bucket
# "empty" by a few microseconds. A call is refused only when it is early by more than this.
SLACK = 0.001


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    retry_after: int  # whole seconds until a hit would be allowed again (0 when allowed)
    # Epoch seconds when the limit gives a hit back, seed 000's X-RateLimit-Reset: a sliding
    # window's oldest hit leaves it; a token bucket is full again.
    reset: float = 0.0


class _Limiter:
    """A limit's Redis script, its memory fallback and the switch between the two."""

    _script_text = ""
    _spend_text = ""  # a script that takes tokens whatever the limit says, where there is one

    def __init__(
        self,
        *,
        name: str,
        limit: int,
        window: float,
        redis_url: str | None = None,
        max_keys: int = 100_000,
        prefix: str = "agentmesh:",
    ) -> None:
        if limit < 1 or window <= 0:
            raise ValueError(f"a limit of {limit} per {window} s")
        self.name = name
        # The mesh's Redis keys' prefix (AGENTMESH_BUS_PREFIX): meshes sharing a Redis count
        # apart.
        self._key_prefix = f"{prefix}rl:{name}:"
        self.limit = limit
        self.window = window
        self._max_keys = max_keys
        self._memory: OrderedDict[str, Any] = OrderedDict()
        self._redis = (
            redis.from_url(redis_url, socket_connect_timeout=0.25, socket_timeout=0.25)
            if redis_url
            else None
        )
        self._script = self._redis.register_script(self._script_text) if self._redis else None
        self._spend_script = (
            self._redis.register_script(self._spend_text)
            if self._redis and self._spend_text
            else None
        )
        self._redis_down_until = 0.0

    async def hit(self, key: str) -> Verdict:
        """Counts one event for ``key`` if the limit allows it, and says whether it did."""
        now = time.time()
        reply = await self._in_redis(
            self._script, key, [now, self.window, self.limit, uuid.uuid4().hex, SLACK]
        )
        if reply is not None:
            return self._from_redis(reply, now)
        verdict, self._memory[key] = self._in_memory(self._state(key), now)
        return verdict

    async def _in_redis(self, script: Any, key: str, args: list[Any]) -> Any:
        """The script's reply, or None when Redis is not used (or failed just now)."""
        if script is None or time.time() < self._redis_down_until:
            return None
        try:
            with redis_span("EVALSHA"):
                return await script(keys=[self._key_prefix + key], args=args)
        except (redis.RedisError, OSError) as exc:
            self._redis_down_until = time.time() + REDIS_RETRY_SECONDS
            log.warning("rate limit store unreachable, counting in memory: %s", exc)
            return None

    def _state(self, key: str) -> Any:
        """The key's state in memory (None: none yet), now its most recently used."""
        state = self._memory.get(key)
        if state is None:
            if len(self._memory) >= self._max_keys:
                self._memory.popitem(last=False)  # bounded: the least recently used key goes
        else:
            self._memory.move_to_end(key)
        return state

    def _from_redis(self, reply: Any, now: float) -> Verdict:
        raise NotImplementedError

    def _in_memory(self, state: Any, now: float) -> tuple[Verdict, Any]:
        """The verdict on one more hit, and the key's state after it."""
        raise NotImplementedError

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
            self._script = self._spend_script = None


class SlidingWindowLimiter(_Limiter):
    """At most ``limit`` hits per ``window`` seconds for each key."""

    _script_text = _SLIDING_WINDOW

    def _from_redis(self, reply: Any, now: float) -> Verdict:
        allowed, remaining, retry, frees = reply
        return Verdict(bool(allowed), self.limit, int(remaining), _ceil(float(retry)), float(frees))

    def _in_memory(self, state: deque[float] | None, now: float) -> tuple[Verdict, deque[float]]:
        hits: deque[float] = deque() if state is None else state
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if len(hits) < self.limit:
            hits.append(now)
            return Verdict(True, self.limit, self.limit - len(hits), 0, hits[0] + self.window), hits
        frees = hits[0] + self.window
        return Verdict(False, self.limit, 0, _ceil(frees - now), frees), hits


class TokenBucketLimiter(_Limiter):
    """A burst of ``limit`` hits, refilled at ``limit`` per ``window`` seconds, for each key."""

    _script_text = _TOKEN_BUCKET
    _spend_text = _TOKEN_BUCKET_SPEND

    def _from_redis(self, reply: Any, now: float) -> Verdict:
        allowed, full = reply
        return self._verdict(bool(allowed), float(full), now)

    def _in_memory(self, state: float | None, now: float) -> tuple[Verdict, float]:
        full = max(state or 0.0, now)
        after = full + self.window / self.limit
        if after - self.window > now + SLACK:
            return self._verdict(False, full, now), full
        return self._verdict(True, after, now), after

    async def spend(self, key: str, tokens: int) -> None:
        """Takes ``tokens`` from ``key``'s bucket, whatever it holds: a bucket taken below
        empty refuses the key's calls until it has refilled past empty again."""
        if tokens <= 0:
            return
        now = time.time()
        args = [now, self.window, self.limit, tokens]
        if await self._in_redis(self._spend_script, key, args) is None:
            full = max(self._state(key) or 0.0, now)
            self._memory[key] = full + tokens * self.window / self.limit

    def _verdict(self, allowed: bool, full: float, now: float) -> Verdict:
        """A verdict from the moment the bucket is full again (after this hit, if allowed)."""
        interval = self.window / self.limit
        if not allowed:
            return Verdict(False, self.limit, 0, _ceil(full + interval - self.window - now), full)
        # Tokens left: the empty part of the window ahead, in intervals.
        remaining = math.floor((self.window - (full - now) + SLACK) / interval)
        return Verdict(True, self.limit, max(0, min(self.limit, remaining)), 0, full)


def _ceil(seconds: float) -> int:
    return max(1, math.ceil(seconds)) if seconds > 0 else 0
