"""Signals between the replicas of one service over the bus: what a process cannot do for the
others itself (reach an agent it does not hold, forget what another remembers), it publishes on
the service's topic, and every replica follows that topic and acts on the others' entries.

Signals only hasten what the replicas would learn anyway (a poll, an expiry), so publishing is
best effort: a bus outage costs latency, is logged once, and never fails the caller's request.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping

from .bus import Bus, BusUnavailable, Entry
from .follower import Follower

PUBLISH_TIMEOUT = 1.0

# Acts on another replica's entry; raises ValueError, TypeError or KeyError when it is malformed.
Act = Callable[[Mapping[str, str]], None]


class Broadcast:
    """One process's side of a topic of signals. ``what`` names them in the log ("agents
    signals"). ``follower`` is None for a process that only publishes (the CLI)."""

    def __init__(
        self,
        bus: Bus,
        follower: Follower | None,
        *,
        topic: str,
        what: str,
        log: logging.Logger,
        retention_ms: int,
        max_len: int,
    ) -> None:
        self.bus = bus
        self._follower = follower
        self._topic = topic
        self._what = what
        self._log = log
        self._retention_ms = retention_ms
        self._max_len = max_len
        # Marks this process's entries, which its follower reads back.
        self._origin = uuid.uuid4().hex
        self._unlisten: Callable[[], None] | None = None
        self._published = True  # whether the last publish succeeded

    def start(self, act: Act) -> None:
        """Calls ``act`` for every entry another process publishes from now on."""
        if self._follower is None or self._unlisten is not None:
            return

        def on_entry(entry: Entry) -> None:
            if entry.fields.get("origin") == self._origin:
                return
            try:
                act(entry.fields)
            except (ValueError, TypeError, KeyError) as exc:
                self._log.warning("ignored a malformed %s entry %s: %s", self._what, entry.id, exc)

        self._unlisten = self._follower.listen(on_entry)

    def stop(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None

    async def publish(self, fields: Mapping[str, str]) -> bool:
        """Publishes an entry; whether it went out. A failure is logged once per outage."""
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await self.bus.publish(
                    self._topic,
                    {**fields, "origin": self._origin},
                    retention_ms=self._retention_ms,
                    max_len=self._max_len,
                )
        except (BusUnavailable, TimeoutError) as exc:
            if self._published:
                self._log.warning(
                    "could not publish %s (%s): %s", self._what, fields.get("kind", ""), exc
                )
            self._published = False
            return False
        if not self._published:
            self._log.info("%s are published again", self._what)
        self._published = True
        return True
