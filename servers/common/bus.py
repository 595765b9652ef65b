"""The bus: append-only topics that carry events and wake-ups between the services of the mesh.

Two implementations with one behaviour (the same test suite runs on both):

- ``MemoryBus``: the embedded default, inside one process; retention in memory.
- ``RedisBus``: Redis Streams through ``redis.asyncio``; many processes act as one.

A topic is an ordered log of entries. An entry has an id ("<milliseconds>-<sequence>", Redis
Streams' format, increasing within a topic) and a flat mapping of string fields. Readers either
follow a topic from an id (every reader sees every entry: fan-out, used for event subscribers and
wake-ups), or share it in a consumer group (each entry goes to one consumer of the group, stays
pending until acknowledged, and entries left pending by a consumer that died are reclaimed by
another after an idle time).

Every method may raise ``BusUnavailable`` (Redis is down or timed out); callers retry.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping
from dataclasses import dataclass

# An entry id: Redis Streams' "<milliseconds>-<sequence>", each part a 64-bit unsigned number.
# ASCII digits only (\d takes any script's) and nothing after (``$`` lets a newline through).
ID_PATTERN = re.compile(r"[0-9]{1,20}-[0-9]{1,20}\Z")
ID_PART_MAX = 2**64 - 1


class BusUnavailable(RuntimeError):
    """The bus cannot be reached now; try again later."""


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    fields: Mapping[str, str]


def owner_index(topic: str, owner: str) -> str:
    """The index topic of one owner's entries of ``topic`` (see Bus.publish)."""
    return f"{topic}.owner.{owner}"


def parse_id(entry_id: str) -> tuple[int, int]:
    """(milliseconds, sequence) of an entry id; ValueError when malformed."""
    if not ID_PATTERN.match(entry_id):
        raise ValueError(f"malformed entry id {entry_id!r}")
    ms, seq = (int(part) for part in entry_id.split("-"))
    if ms > ID_PART_MAX or seq > ID_PART_MAX:  # Redis refuses them as ids
        raise ValueError(f"entry id {entry_id!r} out of range")
    return ms, seq


class Bus(abc.ABC):
    """The operations the mesh uses. ``after`` ids are exclusive; "0-0" means the beginning."""

    @abc.abstractmethod
    async def publish(
        self,
        topic: str,
        fields: Mapping[str, str],
        *,
        retention_ms: int,
        max_len: int,
        index: str = "",
    ) -> str:
        """Appends an entry and returns its id. Entries older than ``retention_ms`` and beyond
        the newest ``max_len`` may be dropped (trimming may be approximate, never below).

        ``index``: a topic that gets the same entry, under the same id, in the same step: an
        index of the entries of ``topic`` that some readers want (one owner's events), read
        like any topic, with ids that are positions in ``topic`` too. It is trimmed as ``topic``
        is, and no further back than ``topic`` retains; once nothing was added to it for
        ``retention_ms`` it is dropped. Only ``publish`` writes to an index."""

    @abc.abstractmethod
    async def range(self, topic: str, after: str, count: int) -> list[Entry]:
        """Up to ``count`` retained entries with ids greater than ``after``, oldest first."""

    @abc.abstractmethod
    async def read(self, topic: str, after: str, *, count: int, block: float) -> list[Entry]:
        """Like ``range``, but when there is none yet, waits up to ``block`` seconds for one."""

    @abc.abstractmethod
    async def last_id(self, topic: str) -> str:
        """The id of the newest entry ("0-0" when the topic is empty): where a reader that wants
        only new entries starts."""

    @abc.abstractmethod
    async def first_id(self, topic: str) -> str:
        """The id of the oldest retained entry ("0-0" when the topic is empty)."""

    @abc.abstractmethod
    async def ensure_group(self, topic: str, group: str) -> None:
        """Creates the consumer group (idempotent), starting at the topic's end."""

    @abc.abstractmethod
    async def read_group(
        self, topic: str, group: str, consumer: str, *, count: int, block: float
    ) -> list[Entry]:
        """New entries for this consumer of the group (each entry goes to one consumer and is
        pending until acknowledged); waits up to ``block`` seconds when there is none. A group
        that is gone (Redis restarted without persistence) is created again from the topic's
        start, so its consumers go on with whatever the topic still holds."""

    @abc.abstractmethod
    async def ack(self, topic: str, group: str, ids: list[str]) -> None:
        """Acknowledges entries of the group: they are no longer pending."""

    @abc.abstractmethod
    async def claim_stale(
        self, topic: str, group: str, consumer: str, *, min_idle: float, count: int
    ) -> list[Entry]:
        """Takes over up to ``count`` entries pending in the group for at least ``min_idle``
        seconds (their consumer died or is stuck) and returns them, now pending with
        ``consumer``."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Whether the bus is reachable now (never raises)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Releases connections and wakes blocked readers; afterwards calls raise
        BusUnavailable."""


def open_bus(redis_url: str | None, *, prefix: str = "agentmesh:") -> Bus:
    """Redis Streams when a URL is given, else the in-process bus."""
    if redis_url:
        from .redisbus import RedisBus

        return RedisBus(redis_url, prefix=prefix)
    from .membus import MemoryBus

    return MemoryBus()
