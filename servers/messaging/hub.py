"""Wake-ups for the inbox streams and SendRequest waiters of this process.

The database holds the messages; the hub only says "look again", or, inside the process that
stored a message, hands over the stored row so that nobody reads it back. After a send commits,
the sender's process tells its own listeners at once and publishes a notification on the bus
topic "messages"; every process follows that topic and wakes the listeners it holds with the
message's id, so a message sent through one replica reaches a stream held by another. A lost
notification costs only latency: streams and waiters also poll the database.

Listeners only read the rows they are handed; a row is shared by the sender's answer, a stream
and a waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from servers.common.bus import Bus, BusUnavailable, Entry
from servers.common.errors import Conflict

if TYPE_CHECKING:
    from .domain import NewMessage
    from .models import MessageRow

log = logging.getLogger("agentmesh.messaging")

TOPIC = "messages"
# Notifications are wake-ups: a reader that misses them polls, so keep only a short tail.
RETENTION_MS = 60_000
MAX_LEN = 10_000
PUBLISH_TIMEOUT = 1.0


class Follows(Protocol):
    """What the hub needs of servers/common/follower.py's Follower."""

    def listen(self, callback: Callable[[Entry], None]) -> Callable[[], None]: ...


class Listener(Protocol):
    """An inbox stream, as the hub sees it (stream.py)."""

    def offer(self, row: MessageRow | None, message_id: str) -> None:
        """A message for the stream's agent was stored: ``row`` when this process stored it
        (and it may go out as is), else None and its id to read."""


class Waiter:
    """A SendRequest waiting for the response to its correlation_id from ``responder`` (the
    request's recipient: a response from any other agent is not the answer, whatever
    correlation id it carries)."""

    def __init__(self, hub: InboxHub, key: tuple[str, str], responder: str) -> None:
        self._hub = hub
        self.key = key
        self.responder = responder
        self.woken = asyncio.Event()
        self._offered: MessageRow | None = None

    def offer(self, row: MessageRow | None) -> None:
        """Wakes the waiter; ``row``: the response, when this process stored it."""
        if row is not None and self._offered is None:
            self._offered = row
        self.woken.set()

    def take(self) -> MessageRow | None:
        """The response this process stored for the waiter, once; None when there is none."""
        row, self._offered = self._offered, None
        return row

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
        self._streams: dict[str, set[Listener]] = {}
        self._waiters: dict[tuple[str, str], Waiter] = {}
        self._unlisten: Callable[[], None] | None = None
        # Marks this process's notifications, which its follower reads back from the bus:
        # their listeners here were told at once.
        self._origin = uuid.uuid4().hex

    def start(self) -> None:
        """Starts listening to the bus (through the process's follower of the topic)."""
        if self._follower is not None and self._unlisten is None:
            self._unlisten = self._follower.listen(self._on_entry)

    def stop(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None

    def watch(self, agent_id: str, listener: Listener) -> None:
        """``listener`` hears of every message stored for ``agent_id`` from now on."""
        self._streams.setdefault(agent_id, set()).add(listener)

    def unwatch(self, agent_id: str, listener: Listener) -> None:
        listeners = self._streams.get(agent_id)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self._streams[agent_id]

    def expect(self, agent_id: str, correlation_id: str, responder: str) -> Waiter:
        """Registers a waiter for ``responder``'s response; CONFLICT when this agent already
        waits on this correlation id."""
        key = (agent_id, correlation_id)
        if key in self._waiters:
            raise Conflict(
                "this agent already waits for a response with this correlation_id",
                details={"correlation_id": correlation_id},
            )
        waiter = self._waiters[key] = Waiter(self, key, responder)
        return waiter

    def awaits(self, agent_id: str, message: NewMessage, sender: str) -> bool:
        """Whether ``message``, from ``sender`` to ``agent_id``, is a response that a
        SendRequest of this process waits for (and will take from ``notify``)."""
        if message.type != "response":
            return False
        waiter = self._waiters.get((agent_id, message.correlation_id))
        return waiter is not None and waiter.responder == sender

    def wake(self, fields: Mapping[str, str], row: MessageRow | None = None) -> bool:
        """Tells whoever here waits for the message a notification tells of; ``row``: the
        message itself, when this process stored it. True when a waiter took ``row``."""
        to = fields.get("to", "")
        if fields.get("type") == "response":
            waiter = self._waiters.get((to, fields.get("correlation_id", "")))
            if waiter is not None and waiter.responder == fields.get("from"):
                waiter.offer(row)
                if row is not None:
                    return True  # the waiter delivers it; an inbox stream never sees it
            # A waiter in another process may take it: streams read it back, with the
            # database's word on whether it is awaited.
            row = None
        for listener in self._streams.get(to, ()):
            listener.offer(row, fields.get("id", ""))
        return False

    def _on_entry(self, entry: Entry) -> None:
        if entry.fields.get("origin") != self._origin:
            self.wake(entry.fields)

    async def notify(self, fields: Mapping[str, str], row: MessageRow | None = None) -> bool:
        """Tells every process (this one at once, with ``row``) that a message was stored.
        True when a waiter here took ``row``."""
        taken = self.wake(fields, row)
        if self._bus is None:
            return taken
        published = {**fields, "origin": self._origin}
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await self._bus.publish(
                    TOPIC, published, retention_ms=RETENTION_MS, max_len=MAX_LEN
                )
        except (BusUnavailable, TimeoutError) as exc:
            # Other processes' streams find the message on their next poll.
            log.warning("could not publish a message notification: %s", exc)
        return taken
