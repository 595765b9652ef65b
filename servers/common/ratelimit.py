"""Sliding-window limits, kept in Redis when configured, in memory otherwise or while Redis fails.

With Redis, replicas share one count (an atomic server-side script per hit). When Redis does not
answer, the limiter falls back to its own memory at once and tries Redis again after a pause, so a
Redis outage neither blocks logins nor lifts the limits.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass

import redis.asyncio as redis

log = logging.getLogger("agentmesh.ratelimit")

_SLIDING_WINDOW = """
local key, now, window, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
if count < limit then
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('PEXPIRE', key, math.ceil(window * 1000))
  return {1, limit - count - 1, '0'}
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return {0, 0, tostring(tonumber(oldest[2]) + window - now)}
"""

REDIS_RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    retry_after: int  # whole seconds until a hit would be allowed again (0 when allowed)


class SlidingWindowLimiter:
    """At most ``limit`` hits per ``window`` seconds for each key."""

    def __init__(
        self,
        *,
        name: str,
        limit: int,
        window: float,
        redis_url: str | None = None,
        max_keys: int = 100_000,
    ) -> None:
        self.name = name
        self.limit = limit
        self.window = window
        self._max_keys = max_keys
        self._memory: OrderedDict[str, deque[float]] = OrderedDict()
        self._redis = (
            redis.from_url(redis_url, socket_connect_timeout=0.25, socket_timeout=0.25)
            if redis_url
            else None
        )
        self._script = self._redis.register_script(_SLIDING_WINDOW) if self._redis else None
        self._redis_down_until = 0.0

    async def hit(self, key: str) -> Verdict:
        """Counts one event for ``key`` if the limit allows it, and says whether it did."""
        now = time.time()
        if self._script is not None and now >= self._redis_down_until:
            try:
                allowed, remaining, retry = await self._script(
                    keys=[f"agentmesh:rl:{self.name}:{key}"],
                    args=[now, self.window, self.limit, uuid.uuid4().hex],
                )
                return Verdict(bool(allowed), self.limit, int(remaining), _ceil(float(retry)))
            except (redis.RedisError, OSError) as exc:
                self._redis_down_until = now + REDIS_RETRY_SECONDS
                log.warning("rate limit store unreachable, counting in memory: %s", exc)
        return self._hit_memory(key, now)

    def _hit_memory(self, key: str, now: float) -> Verdict:
        hits = self._memory.get(key)
        if hits is None:
            hits = self._memory[key] = deque()
            if len(self._memory) > self._max_keys:
                self._memory.popitem(last=False)  # bounded: the least recently used key goes
        else:
            self._memory.move_to_end(key)
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if len(hits) < self.limit:
            hits.append(now)
            return Verdict(True, self.limit, self.limit - len(hits), 0)
        return Verdict(False, self.limit, 0, _ceil(hits[0] + self.window - now))

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
            self._script = None


def _ceil(seconds: float) -> int:
    return max(1, math.ceil(seconds)) if seconds > 0 else 0
