"""Wake-ups for the inbox streams and SendRequest waiters of this process.

The database holds the messages; the hub only says "look again". After a send commits, the
sender's process wakes its own listeners at once and publishes a notification on the bus topic
"messages"; every process follows that topic and wakes the listeners it holds, so a message
sent through one replica reaches a stream held by another. A lost notification costs only
latency: streams and waiters also poll the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from servers.common.bus import Bus, BusUnavailable, Entry
from servers.common.errors import Conflict

log = logging.getLogger("agentmesh.messaging")

TOPIC = "messages"
# Notifications are wake-ups: a reader that misses them polls, so keep only a short tail.
RETENTION_MS = 60_000
MAX_LEN = 10_000
PUBLISH_TIMEOUT = 1.0


class Follows(Protocol):
    """What the hub needs of servers/common/follower.py's Follower."""

    def listen(self, callback: Callable[[Entry], None]) -> Callable[[], None]: ...


class Waiter:
    """A SendRequest waiting for the response to its correlation_id."""

    def __init__(self, hub: InboxHub, key: tuple[str, str]) -> None:
        self._hub = hub
        self.key = key
        self.woken = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Returns when woken or after ``timeout`` seconds, whichever comes first."""
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
        # that arrives together with the wake-up.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.woken.wait()
        self.woken.clear()

    def close(self) -> None:
        if self._hub._waiters.get(self.key) is self:
            del self._hub._waiters[self.key]


class InboxHub:
    """Inbox streams (by recipient) and SendRequest waiters (by requester and correlation id)
    of this process, and the notifications that wake them."""

    def __init__(self, *, bus: Bus | None = None, follower: Follows | None = None) -> None:
        self._bus = bus
        self._follower = follower
        self._streams: dict[str, set[asyncio.Event]] = {}
        self._waiters: dict[tuple[str, str], Waiter] = {}
        self._unlisten: Callable[[], None] | None = None

    def start(self) -> None:
        """Starts listening to the bus (through the process's follower of the topic)."""
        if self._follower is not None and self._unlisten is None:
            self._unlisten = self._follower.listen(self._on_entry)

    def stop(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None

    def watch(self, agent_id: str) -> asyncio.Event:
        """An event set whenever a message for ``agent_id`` may have arrived."""
        event = asyncio.Event()
        self._streams.setdefault(agent_id, set()).add(event)
        return event

    def unwatch(self, agent_id: str, event: asyncio.Event) -> None:
        events = self._streams.get(agent_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._streams[agent_id]

    def expect(self, agent_id: str, correlation_id: str) -> Waiter:
        """Registers a waiter; CONFLICT when this agent already waits on this correlation id."""
        key = (agent_id, correlation_id)
        if key in self._waiters:
            raise Conflict(
                "this agent already waits for a response with this correlation_id",
                details={"correlation_id": correlation_id},
            )
        waiter = self._waiters[key] = Waiter(self, key)
        return waiter

    def wake(self, fields: Mapping[str, str]) -> None:
        """Wakes whoever here waits for the message a notification tells of."""
        to = fields.get("to", "")
        for event in self._streams.get(to, ()):
            event.set()
        if fields.get("type") == "response":
            waiter = self._waiters.get((to, fields.get("correlation_id", "")))
            if waiter is not None:
                waiter.woken.set()

    def _on_entry(self, entry: Entry) -> None:
        self.wake(entry.fields)

    async def notify(self, fields: Mapping[str, str]) -> None:
        """Tells every process (this one at once) that a message was stored."""
        self.wake(fields)
        if self._bus is None:
            return
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await self._bus.publish(TOPIC, fields, retention_ms=RETENTION_MS, max_len=MAX_LEN)
        except (BusUnavailable, TimeoutError) as exc:
            # Other processes' streams find the message on their next poll.
            log.warning("could not publish a message notification: %s", exc)
