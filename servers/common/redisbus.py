"""The bus on Redis Streams (``redis.asyncio``): processes that share a Redis share its topics.

A topic is the stream at key ``prefix + topic``; a consumer group is a group of that stream.

Two connection pools: commands that answer at once have a short socket timeout, so a Redis that
is down or hung fails in about a second; blocking reads (``XREAD``/``XREADGROUP BLOCK``) have none
and are bounded by their block time plus a margin instead. The client retries nothing: a publish
whose reply was lost would be published twice, and callers retry on ``BusUnavailable`` anyway.
Connections are reopened on the next command, so the bus works again once Redis is back.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .bus import Bus, BusUnavailable, Entry, parse_id
from .tracing import redis_span

TIMEOUT = 1.0  # seconds to connect, and for any command that does not block
BLOCK_MARGIN = 1.0  # seconds a blocking read may take beyond its block time

_ERRORS = (redis.RedisError, OSError, TimeoutError)


def _cancelled_as(error: BaseException) -> None:
    """Raises CancelledError when the running task is being cancelled and ``error`` stands in
    for that: Python 3.11's asyncio.timeout turns a cancellation that lands as the timeout
    expires into TimeoutError, and redis-py may turn one into a connection error. Taken for
    a bus outage, it would be swallowed and the task (a callback worker, a follower) would
    run on after being told to stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from error


async def _own_task(command: Awaitable[Any]) -> Any:
    """Awaits a redis-py command in a task of its own, so that cancelling the caller ends its
    wait at once. redis-py cleans up after a cancelled command (the connection goes back to
    its pool, under the pool's lock, and may be closed there) before the cancellation reaches
    the caller; that clean-up was seen to hang past 10 s, and with it a callback worker told
    to stop. The command's task is cancelled too and finishes its clean-up on its own."""
    inner = asyncio.ensure_future(command)
    inner.add_done_callback(_retrieved)
    try:
        return await asyncio.shield(inner)
    except asyncio.CancelledError:
        inner.cancel()
        raise


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Marks an abandoned command's error as seen (asyncio would log it as never retrieved)."""
    if not task.cancelled():
        task.exception()


# Appends and trims in one round trip. Retention is measured on Redis' clock (the id it gives
# the new entry), so a client whose clock runs ahead never trims entries still retained. Both
# trims are approximate ("~"): Redis drops whole nodes of the stream, never a retained entry.
# With a second key, the index (Bus.publish) gets the entry under the same id, is trimmed
# alike and to no further back than the topic's first entry, and expires when idle.
_PUBLISH = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
local min_ms = tonumber(string.match(id, '^%d+')) - tonumber(ARGV[2])
if min_ms > 0 then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%d', min_ms))
end
if KEYS[2] then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], id, unpack(ARGV, 3))
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1]
  redis.call('XTRIM', KEYS[2], 'MINID', '~', first)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return id
"""


class RedisBus(Bus):
    """The bus on the Redis at ``url``; every key starts with ``prefix``."""

    def __init__(self, url: str, *, prefix: str = "agentmesh:") -> None:
        self._prefix = prefix
        options: dict[str, Any] = {
            "decode_responses": True,
            "protocol": 2,  # the reply shapes parsed below
            "socket_connect_timeout": TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
        }
        self._redis = redis.from_url(url, socket_timeout=TIMEOUT, **options)
        self._blocking = redis.from_url(url, socket_timeout=None, **options)
        self._publish = self._redis.register_script(_PUBLISH)
        self._closed = False

    async def __aenter__(self) -> RedisBus:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _key(self, topic: str) -> str:
        return self._prefix + topic

    async def _run(self, call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """Runs a command that answers at once (its socket timeout bounds it)."""
        if self._closed:
            raise BusUnavailable("the bus is closed")
        try:
            with redis_span(getattr(call, "__name__", "EVALSHA").upper()):
                return await _own_task(call(*args, **kwargs))
        except _ERRORS as exc:
            _cancelled_as(exc)
            raise BusUnavailable(f"redis: {exc!r}") from exc

    async def _block(
        self, block: float, call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        """Runs a command that waits up to ``block`` seconds on the server; None when the bus
        was closed meanwhile (``close`` cuts the connection to wake it)."""
        if self._closed:
            raise BusUnavailable("the bus is closed")
        try:
            async with asyncio.timeout(block + BLOCK_MARGIN):
                return await _own_task(call(*args, block=math.ceil(block * 1000), **kwargs))
        except _ERRORS as exc:
            _cancelled_as(exc)
            if self._closed:
                return None
            raise BusUnavailable(f"redis: {exc!r}") from exc

    async def publish(
        self,
        topic: str,
        fields: Mapping[str, str],
        *,
        retention_ms: int,
        max_len: int,
        index: str = "",
    ) -> str:
        flat = [item for pair in fields.items() for item in pair]
        keys = [self._key(topic), *([self._key(index)] if index else [])]
        entry_id: str = await self._run(
            self._publish, keys=keys, args=[max_len, retention_ms, *flat]
        )
        return entry_id

    async def range(self, topic: str, after: str, count: int) -> list[Entry]:
        parse_id(after)
        reply = await self._run(self._redis.xrange, self._key(topic), f"({after}", "+", count)
        return _entries(reply)

    async def read(self, topic: str, after: str, *, count: int, block: float) -> list[Entry]:
        parse_id(after)
        streams = {self._key(topic): after}
        # In Redis BLOCK 0 waits forever; a read that must not wait leaves BLOCK out.
        if block <= 0:
            reply = await self._run(self._redis.xread, streams, count=count)
        else:
            reply = await self._block(block, self._blocking.xread, streams, count=count)
        return _read_entries(reply)

    async def last_id(self, topic: str) -> str:
        reply = await self._run(self._redis.xrevrange, self._key(topic), "+", "-", 1)
        return str(reply[0][0]) if reply else "0-0"

    async def first_id(self, topic: str) -> str:
        reply = await self._run(self._redis.xrange, self._key(topic), "-", "+", 1)
        return str(reply[0][0]) if reply else "0-0"

    async def ensure_group(self, topic: str, group: str) -> None:
        await self._create_group(self._key(topic), group, "$")

    async def _create_group(self, key: str, group: str, start: str) -> None:
        try:
            await self._run(self._redis.xgroup_create, key, group, start, mkstream=True)
        except BusUnavailable as exc:
            if not _response_error(exc, "BUSYGROUP"):
                raise

    async def read_group(
        self, topic: str, group: str, consumer: str, *, count: int, block: float
    ) -> list[Entry]:
        key = self._key(topic)
        try:
            return await self._read_group(key, group, consumer, count=count, block=block)
        except BusUnavailable as exc:
            if not _response_error(exc, "NOGROUP"):
                raise
        # The group is gone: Redis restarted without its data, or the key was deleted. What the
        # stream holds now was published since, so the new group starts at its beginning.
        await self._create_group(key, group, "0")
        return await self._read_group(key, group, consumer, count=count, block=block)

    async def _read_group(
        self, key: str, group: str, consumer: str, *, count: int, block: float
    ) -> list[Entry]:
        streams = {key: ">"}
        if block <= 0:
            reply = await self._run(self._redis.xreadgroup, group, consumer, streams, count)
        else:
            reply = await self._block(
                block, self._blocking.xreadgroup, group, consumer, streams, count
            )
        return _read_entries(reply)

    async def ack(self, topic: str, group: str, ids: list[str]) -> None:
        for entry_id in ids:
            parse_id(entry_id)
        if ids:
            await self._run(self._redis.xack, self._key(topic), group, *ids)

    async def claim_stale(
        self, topic: str, group: str, consumer: str, *, min_idle: float, count: int
    ) -> list[Entry]:
        key = self._key(topic)
        claimed: list[Entry] = []
        cursor = "0-0"
        # XAUTOCLAIM looks at a bounded part of the pending list per call; go on from its cursor
        # until enough are claimed or the whole list was looked at (the cursor comes back "0-0").
        while len(claimed) < count:
            try:
                reply = await self._run(
                    self._redis.xautoclaim,
                    key,
                    group,
                    consumer,
                    int(min_idle * 1000),
                    cursor,
                    count=count - len(claimed),
                )
            except BusUnavailable as exc:
                if _response_error(exc, "NOGROUP"):  # no group: nothing is pending in it
                    return claimed
                raise
            cursor = str(reply[0])
            # Entries deleted while pending leave the list and are not handed over; Redis 7
            # lists their ids apart (reply[2]), Redis 6.2 returned them without fields.
            claimed += _entries(reply[1])
            if cursor == "0-0":
                break
        return claimed

    async def ping(self) -> bool:
        if self._closed:
            return False
        try:
            async with asyncio.timeout(TIMEOUT):
                return bool(await self._redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Cutting the connections of blocked reads wakes them (they then return nothing).
        await self._blocking.aclose()
        await self._redis.aclose()


def _entries(reply: list[tuple[str, dict[str, str] | None]] | None) -> list[Entry]:
    return [Entry(entry_id, fields) for entry_id, fields in reply or () if fields is not None]


def _read_entries(reply: list[list[Any]] | None) -> list[Entry]:
    # XREAD and XREADGROUP answer [[key, entries]] for the one stream they were given.
    return _entries(reply[0][1]) if reply else []


def _response_error(exc: BusUnavailable, code: str) -> bool:
    cause = exc.__cause__
    return isinstance(cause, redis.ResponseError) and str(cause).startswith(code)
