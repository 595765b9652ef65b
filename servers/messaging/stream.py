"""An agent's open inbox: every unacknowledged message, oldest first, then each new one.

Two parts per stream. A puller reads the database (on open, when the hub wakes it, and every
poll interval) into a bounded queue of frames; the writer (``frames()``) hands them out, with a
heartbeat when idle and a last frame on failure or shutdown. The database is the truth, so a
missed wake-up only delays a message until the next poll, and whatever is unacknowledged when
a stream ends is sent again on the next one (at-least-once).

A stream remembers which messages it has sent and reads only messages created after
``LOOKBACK`` before its last complete read: a message commits within moments of its
``created_at`` (domain.py takes it inside the transaction), and LOOKBACK leaves room for slow
commits and for clock differences between replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from servers.common.clock import aware, now

from .domain import Messages
from .models import MessageRow
from .store import MessageStore, Position

log = logging.getLogger("agentmesh.messaging")

LOOKBACK = timedelta(seconds=60)
PAGE = 100
# Frames read ahead for one stream: at most this many messages wait in memory for the agent.
QUEUE_SIZE = 100


@dataclass(frozen=True)
class Ping:
    """The stream is alive and has nothing to send."""

    at: datetime


@dataclass(frozen=True)
class Failed:
    """The stream fails; last frame."""

    code: str
    message: str
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Ended:
    """The stream ends cleanly; last frame."""

    reason: str


Frame = MessageRow | Ping | Failed | Ended


class InboxStream:
    """One open inbox. ``slow_after``: how long the queue may stay full, with messages
    waiting behind it, while the agent takes nothing, before the stream fails with
    SLOW_CONSUMER (default: three heartbeat intervals)."""

    def __init__(
        self,
        messages: Messages,
        agent_id: str,
        *,
        heartbeat: float,
        closing: asyncio.Event,
        queue_size: int = QUEUE_SIZE,
        slow_after: float | None = None,
    ) -> None:
        self._messages = messages
        self._hub = messages.hub
        self.agent_id = agent_id
        self._heartbeat = heartbeat
        self._closing = closing
        self._size = queue_size
        self._slow_after = 3 * heartbeat if slow_after is None else slow_after
        self._frames: deque[Frame] = deque()
        self._ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._sent: dict[str, datetime] = {}
        self._since: datetime | None = None
        self._behind = False
        self._failed = False
        self._taken = time.monotonic()

    async def frames(self) -> AsyncGenerator[Frame, None]:
        """The frames to send, until a Failed or Ended one (or the caller stops reading)."""
        self._wake = self._hub.watch(self.agent_id)
        puller = asyncio.create_task(self._pull_loop())
        watcher = asyncio.create_task(self._watch_closing())
        try:
            while True:
                if self._closing.is_set():
                    yield Ended("SERVER_SHUTDOWN")
                    return
                if not self._frames:
                    self._ready.clear()
                    try:
                        async with asyncio.timeout(self._heartbeat):
                            await self._ready.wait()
                    except TimeoutError:
                        yield Ping(now())
                    continue
                frame = self._frames.popleft()
                self._taken = time.monotonic()
                if self._behind and len(self._frames) <= self._size // 2:
                    self._wake.set()
                yield frame
                if isinstance(frame, Failed):
                    return
        finally:
            puller.cancel()
            watcher.cancel()
            await asyncio.gather(puller, watcher, return_exceptions=True)
            self._hub.unwatch(self.agent_id, self._wake)

    async def _watch_closing(self) -> None:
        await self._closing.wait()
        self._ready.set()

    async def _pull_loop(self) -> None:
        while not self._failed:
            self._wake.clear()
            try:
                await self._pull()
            except Exception:  # the database may be away for a moment; poll again later
                log.exception("inbox read failed", extra={"agent_id": self.agent_id})
            if self._failed:
                return
            wait = min(self._heartbeat, self._slow_after) if self._behind else self._heartbeat
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # that arrives together with the wake-up.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _pull(self) -> None:
        """Queues the messages not sent yet, as many as there is room for."""
        started = now()
        after: Position | None = None
        added = 0
        self._behind = False
        async with self._messages.db.session() as s:
            store = MessageStore(s)
            while not self._behind:
                rows = await store.deliverable(
                    self.agent_id, at=started, since=self._since, after=after, limit=PAGE
                )
                for row in rows:
                    after = (row.created_at, row.seq)
                    if row.message_id in self._sent:
                        continue
                    if len(self._frames) >= self._size:
                        self._behind = True
                        break
                    self._frames.append(row)
                    self._sent[row.message_id] = aware(row.created_at)
                    added += 1
                if len(rows) < PAGE:
                    break
        if added:
            self._ready.set()
        if self._behind:
            if time.monotonic() - self._taken > self._slow_after:
                self._fail_slow()
            return
        # Everything created before this read has been seen: the next reads start later.
        self._since = started - LOOKBACK
        self._sent = {k: v for k, v in self._sent.items() if v >= self._since}

    def _fail_slow(self) -> None:
        self._failed = True
        self._frames.clear()
        self._frames.append(
            Failed(
                "SLOW_CONSUMER",
                "the agent does not keep up with its inbox; reconnect to receive the rest",
                {"queued": str(self._size)},
            )
        )
        self._ready.set()
