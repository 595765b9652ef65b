"""The in-process bus: the embedded default. Topics behave as Redis Streams do (see bus.py),
inside one process. Retention is memory only: a restart starts with empty topics, while events
not yet published stay in their service's outbox and are published after the restart."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .bus import Bus, BusUnavailable, Entry, parse_id

Key = tuple[int, int]


def _key(entry_id: str) -> Key:
    return parse_id(entry_id)


def _id(key: Key) -> str:
    return f"{key[0]}-{key[1]}"


@dataclass
class _Pending:
    consumer: str
    since: float


@dataclass
class _Group:
    delivered: Key
    pending: dict[str, _Pending] = field(default_factory=dict)


class _Topic:
    def __init__(self) -> None:
        # Entries and their keys in id order; entries before ``head`` have been trimmed.
        self.keys: list[Key] = []
        self.entries: list[Entry] = []
        self.head = 0
        self.last: Key = (0, 0)
        self.groups: dict[str, _Group] = {}
        self.changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self.keys) - self.head

    def append(self, fields: Mapping[str, str]) -> Entry:
        ms = int(time.time() * 1000)
        key = (ms, 0) if ms > self.last[0] else (self.last[0], self.last[1] + 1)
        entry = Entry(_id(key), dict(fields))
        self.add(key, entry)
        return entry

    def add(self, key: Key, entry: Entry) -> None:
        """Appends an entry whose id is given (after the last)."""
        self.last = key
        self.keys.append(key)
        self.entries.append(entry)
        # Wake every reader waiting on this topic; later readers wait on a fresh event.
        self.changed.set()
        self.changed = asyncio.Event()

    def first(self) -> Key:
        return self.keys[self.head] if len(self) else (0, 0)

    def trim(self, *, min_ms: int, max_len: int, min_key: Key = (0, 0)) -> None:
        while len(self) > max_len or (
            len(self) and (self.keys[self.head][0] < min_ms or self.keys[self.head] < min_key)
        ):
            self.head += 1
        if self.head > 1024 and self.head * 2 > len(self.keys):
            del self.keys[: self.head]
            del self.entries[: self.head]
            self.head = 0

    def after(self, key: Key, count: int) -> list[Entry]:
        start = max(bisect.bisect_right(self.keys, key), self.head)
        return self.entries[start : start + count]

    def present(self, entry_id: str) -> Entry | None:
        key = _key(entry_id)
        i = bisect.bisect_left(self.keys, key)
        if i >= self.head and i < len(self.keys) and self.keys[i] == key:
            return self.entries[i]
        return None


class MemoryBus(Bus):
    def __init__(self) -> None:
        self._topics: dict[str, _Topic] = {}
        self._closed = False
        # Index topics, and when each is dropped (monotonic seconds) unless added to again.
        self._index_expiry: dict[str, float] = {}
        self._next_sweep = 0.0

    def _topic(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = _Topic()
        return topic

    async def publish(
        self,
        topic: str,
        fields: Mapping[str, str],
        *,
        retention_ms: int,
        max_len: int,
        index: str = "",
    ) -> str:
        self._check_open()
        t = self._topic(topic)
        entry = t.append(fields)
        min_ms = int(time.time() * 1000) - retention_ms
        t.trim(min_ms=min_ms, max_len=max_len)
        if index:
            i = self._topic(index)
            i.add(t.last, entry)
            i.trim(min_ms=min_ms, max_len=max_len, min_key=t.first())
            now = time.monotonic()
            self._index_expiry[index] = now + retention_ms / 1000
            if now >= self._next_sweep:
                self._drop_idle_indexes(now)
        return entry.id

    def _drop_idle_indexes(self, now: float) -> None:
        """Drops the index topics nothing was added to for their retention (once a second)."""
        self._next_sweep = now + 1.0
        for name, expiry in list(self._index_expiry.items()):
            if expiry <= now:
                del self._index_expiry[name]
                self._topics.pop(name, None)

    async def range(self, topic: str, after: str, count: int) -> list[Entry]:
        # Not _topic(): reading an index nobody wrote must not create it (nor keep it).
        t = self._topics.get(topic)
        return t.after(_key(after), count) if t is not None else []

    def _check_open(self) -> None:
        if self._closed:
            raise BusUnavailable("the bus is closed")

    async def _wait(self, t: _Topic, block: float, take: Callable[[], list[Entry]]) -> list[Entry]:
        """``take()`` now, or as soon as it finds something within ``block`` seconds."""
        found = take()
        deadline = time.monotonic() + block
        while not found and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives together with the wake-up, and a cancelled follower would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await t.changed.wait()
            # Another reader (of the same group) may have taken what woke us: wait on.
            found = take()
        return found

    async def read(self, topic: str, after: str, *, count: int, block: float) -> list[Entry]:
        self._check_open()
        t = self._topic(topic)
        key = _key(after)
        return await self._wait(t, block, lambda: t.after(key, count))

    async def last_id(self, topic: str) -> str:
        t = self._topic(topic)
        return _id(t.keys[-1]) if len(t) else "0-0"

    async def first_id(self, topic: str) -> str:
        t = self._topic(topic)
        return _id(t.keys[t.head]) if len(t) else "0-0"

    async def ensure_group(self, topic: str, group: str) -> None:
        t = self._topic(topic)
        if group not in t.groups:
            t.groups[group] = _Group(delivered=t.last)

    def _group(self, t: _Topic, group: str) -> _Group:
        # As RedisBus does after Redis lost a group: recreate it, from the topic's start.
        g = t.groups.get(group)
        if g is None:
            g = t.groups[group] = _Group(delivered=(0, 0))
        return g

    async def read_group(
        self, topic: str, group: str, consumer: str, *, count: int, block: float
    ) -> list[Entry]:
        self._check_open()
        t = self._topic(topic)
        g = self._group(t, group)

        def take() -> list[Entry]:
            found = t.after(g.delivered, count)
            now = time.monotonic()
            for entry in found:
                g.pending[entry.id] = _Pending(consumer, now)
            if found:
                g.delivered = _key(found[-1].id)
            return found

        return await self._wait(t, block, take)

    async def ack(self, topic: str, group: str, ids: list[str]) -> None:
        g = self._group(self._topic(topic), group)
        for entry_id in ids:
            g.pending.pop(entry_id, None)

    async def claim_stale(
        self, topic: str, group: str, consumer: str, *, min_idle: float, count: int
    ) -> list[Entry]:
        t = self._topic(topic)
        g = self._group(t, group)
        now = time.monotonic()
        claimed: list[Entry] = []
        for entry_id in sorted(g.pending, key=_key):
            if len(claimed) >= count:
                break
            p = g.pending[entry_id]
            if now - p.since < min_idle:
                continue
            entry = t.present(entry_id)
            if entry is None:  # trimmed away while pending: nothing left to hand over
                del g.pending[entry_id]
                continue
            g.pending[entry_id] = _Pending(consumer, now)
            claimed.append(entry)
        return claimed

    async def ping(self) -> bool:
        return not self._closed

    async def close(self) -> None:
        self._closed = True
        for t in self._topics.values():
            t.changed.set()
