"""One reader per topic and process that hands every new entry to local listeners.

Streams held by this process (event subscribers, agent inboxes, request waiters) listen here
instead of each reading the bus: with Redis, a hundred subscribers cost one blocking read, not a
hundred connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .bus import Bus, BusUnavailable, Entry

log = logging.getLogger("agentmesh.bus")

Listener = Callable[[Entry], None]


class Follower:
    """Follows a topic from its end (as it is when ``run`` starts) and calls each listener, in
    order, for every entry. While the bus is down it retries with backoff from where it was, so
    entries published meanwhile still arrive once the bus is back (as long as they are
    retained)."""

    def __init__(self, bus: Bus, topic: str, *, block: float = 1.0, batch: int = 500) -> None:
        self.bus = bus
        self.topic = topic
        self._block = block
        self._batch = batch
        self._listeners: list[Listener] = []
        # Whether the last read of the bus succeeded.
        self.up = True
        # The id of the last entry handed out; "" until the follower has started.
        self.position = ""
        self.started = asyncio.Event()

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Adds a listener; returns the function that removes it. Listeners must not block:
        they queue the entry and return."""
        self._listeners.append(listener)

        def unlisten() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unlisten

    async def run(self) -> None:
        delay = 0.1
        while True:
            try:
                if not self.position:
                    self.position = await self.bus.last_id(self.topic)
                    self.started.set()
                entries = await self.bus.read(
                    self.topic, self.position, count=self._batch, block=self._block
                )
            except BusUnavailable as exc:
                if self.up:
                    log.warning("bus unavailable, retrying", extra={"topic": self.topic})
                    log.debug("bus error: %s", exc)
                self.up = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if not self.up:
                log.info("bus available again", extra={"topic": self.topic})
            self.up, delay = True, 0.1
            for entry in entries:
                self.position = entry.id
                for listener in tuple(self._listeners):
                    try:
                        listener(entry)
                    except Exception:
                        log.exception("bus listener failed", extra={"topic": self.topic})
