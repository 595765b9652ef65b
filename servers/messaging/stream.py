"""An agent's open inbox: every unacknowledged message, oldest first, then each new one.

Two parts per stream. A puller reads the database into a bounded queue of frames; the writer
(``frames()``) hands them out, with a heartbeat when idle and a last frame on failure or
shutdown. The database is the truth, so a missed wake-up only delays a message until the next
poll, and whatever is unacknowledged when a stream ends is sent again on the next one
(at-least-once).

What is read when:
- a full read, of every deliverable message not sent yet: on open, every poll interval, and
  when the stream has room again after falling behind;
- a read of the messages the hub named (stored by another process);
- nothing, for a message this process stored: the hub hands over the row (``offer``), which
  goes straight to the queue when the stream is caught up.

A stream remembers which messages it has sent and a full read looks only at messages created
after ``LOOKBACK`` before its last complete full read: a message commits within moments of its
``created_at`` (domain.py takes it inside the transaction), and LOOKBACK leaves room for slow
commits and for clock differences between replicas.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from servers.common.auth import CredentialCheck, guard_stream
from servers.common.clock import aware, now
from servers.common.errors import AuthRequired, PermissionDenied
from servers.common.jobs import stop_jobs

from .domain import Messages
from .models import MessageRow
from .store import MessageStore, Position

log = logging.getLogger("agentmesh.messaging")

LOOKBACK = timedelta(seconds=60)
PAGE = 100
# Frames read ahead for one stream: at most this many messages wait in memory for the agent.
QUEUE_SIZE = 100
# Ids of messages to read, named by the hub; past this many the next read is a full one.
NAMED_MAX = 1000
# How long a stream's end waits for its reader jobs (servers/common/jobs.py).
STOP_PATIENCE = 5.0


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
        credential: CredentialCheck | None = None,
    ) -> None:
        self._messages = messages
        self._credential = credential
        self._hub = messages.hub
        self.agent_id = agent_id
        self._heartbeat = heartbeat
        self._closing = closing
        self._size = queue_size
        self._slow_after = 3 * heartbeat if slow_after is None else slow_after
        self._frames: deque[Frame] = deque()
        self._ready = asyncio.Event()
        self._wake = asyncio.Event()  # set: read again
        self._sent: dict[str, datetime] = {}
        self._since: datetime | None = None  # None until the first full read completes
        # A full read that ran out of room: where it stopped, which the next full read
        # continues from, and when the first read of that catch-up began.
        self._resume: Position | None = None
        self._catch_up_began: datetime | None = None
        self._named: set[str] = set()
        self._full = True  # whether the next read is a full one
        self._reading = False
        self._behind = False
        self._failed = False
        self._taken = time.monotonic()

    def offer(self, row: MessageRow | None, message_id: str) -> None:
        """The hub's word that a message for this agent was stored (hub.Listener)."""
        if message_id in self._sent:
            return
        if row is not None and self._takes(row):
            self._queue(row)
            self._ready.set()
            return
        if len(self._named) < NAMED_MAX and message_id:
            self._named.add(message_id)
        else:
            self._full = True
        self._wake.set()

    def _takes(self, row: MessageRow) -> bool:
        """Whether an offered row may go out now: only while nothing older can be waiting
        unread (caught up, no read under way) and there is room."""
        return (
            self._since is not None
            and not self._reading
            and not self._behind
            and not self._failed
            and len(self._frames) < self._size
        )

    def _queue(self, row: MessageRow) -> None:
        self._frames.append(row)
        self._sent[row.message_id] = aware(row.created_at)

    async def frames(self) -> AsyncGenerator[Frame, None]:
        """The frames to send, until a Failed or Ended one (or the caller stops reading)."""
        self._hub.watch(self.agent_id, self)
        puller = asyncio.create_task(self._pull_loop())
        watcher = asyncio.create_task(self._watch_closing())
        guard = asyncio.create_task(guard_stream(self._credential, self._heartbeat, self._refuse))
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
                    self._full = True
                    self._wake.set()
                yield frame
                if isinstance(frame, Failed):
                    return
        finally:
            await stop_jobs((puller, watcher, guard), patience=STOP_PATIENCE)
            self._hub.unwatch(self.agent_id, self)

    async def _watch_closing(self) -> None:
        await self._closing.wait()
        self._ready.set()

    async def _pull_loop(self) -> None:
        while not self._failed:
            self._wake.clear()
            self._reading = True
            try:
                if self._full or self._behind:
                    self._full = False
                    self._named.clear()
                    await self._pull()
                elif self._named:
                    named, self._named = self._named, set()
                    await self._pull(named)
            except Exception:  # the database may be away for a moment; poll again later
                self._full = True
                log.exception("inbox read failed", extra={"agent_id": self.agent_id})
            finally:
                self._reading = False
            if self._failed:
                return
            wait = min(self._heartbeat, self._slow_after) if self._behind else self._heartbeat
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # that arrives together with the wake-up.
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                self._full = True

    async def _pull(self, named: set[str] | None = None) -> None:
        """Queues the messages not sent yet (all, or those ``named``), as many as there is
        room for."""
        started = now()
        # A full read goes on where the last one ran out of room: read from the start each
        # time, a backlog of N messages cost N rows per refill of the queue, N * N / 100 in all.
        after = None if named else self._resume
        added = 0
        self._behind = False
        async with self._messages.db.session() as s:
            store = MessageStore(s)
            while not self._behind:
                # About as many as fit (not fewer than 10 a read), and one to tell whether
                # more wait.
                limit = min(PAGE, max(self._size - len(self._frames), 10) + 1)
                rows = await store.deliverable(
                    self.agent_id,
                    at=started,
                    since=None if named else self._since,
                    after=after,
                    limit=limit,
                    ids=named or (),
                )
                for row in rows:
                    if row.message_id not in self._sent:
                        if len(self._frames) >= self._size:
                            self._behind = True
                            break
                        self._queue(row)
                        added += 1
                    after = (row.created_at, row.seq)
                if len(rows) < limit:
                    break
        if added:
            self._ready.set()
        if named is None:
            began = self._catch_up_began or started
            if self._behind:
                self._resume, self._catch_up_began = after, began
            else:
                # Everything created before this catch-up began has been seen, but a message
                # committed late behind a resumed read's position: the next full reads start
                # LOOKBACK before the catch-up, once, and then later.
                self._resume = self._catch_up_began = None
                self._since = began - LOOKBACK
                self._sent = {k: v for k, v in self._sent.items() if v >= self._since}
        if self._behind and time.monotonic() - self._taken > self._slow_after:
            self._fail_slow()

    def _fail_slow(self) -> None:
        self._fail(
            Failed(
                "SLOW_CONSUMER",
                "the agent does not keep up with its inbox; reconnect to receive the rest",
                {"queued": str(self._size)},
            )
        )

    def _refuse(self, exc: AuthRequired | PermissionDenied) -> None:
        """The stream's credential no longer holds (revoked, expired): it ends with the
        refusal; what it had queued stays unacknowledged for the next stream."""
        self._fail(Failed(exc.reason, exc.message))

    def _fail(self, last: Failed) -> None:
        self._failed = True
        self._frames.clear()
        self._frames.append(last)
        self._ready.set()
        self._wake.set()  # the reader stops
