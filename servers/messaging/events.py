"""EventsService: the events every service writes to its outbox, as a resumable stream.

The relays publish committed events to the bus topic "events"; the bus keeps them for the
retention window. Here one hub per process listens to that topic, parses each event once, and
hands it to the subscriptions that match. A subscription that resumes (``after``, or SSE's
Last-Event-ID) first replays the retained events after its id straight from the bus, then
follows the hub; entries seen twice in the overlap are skipped by id.

Each subscription queues at most ``queue_limit`` events for its consumer. One that falls that
far behind is cut off with an in-band SLOW_CONSUMER error naming the last event it was sent, so
it can resume from there, and the server's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TypeAlias

import grpc
from google.api import httpbody_pb2

from agentmesh.v1 import common_pb2, events_pb2, events_pb2_grpc
from servers.common import sse
from servers.common.auth import (
    Authenticator,
    CredentialCheck,
    current_call_check,
    guard_stream,
)
from servers.common.bus import Bus, BusUnavailable, Entry, owner_index, parse_id
from servers.common.context import Principal, add_cost, current_call, require_principal
from servers.common.errors import AuthRequired, PermissionDenied, Unavailable, ValidationError
from servers.common.follower import Follower
from servers.common.jobs import stop_jobs
from servers.common.outbox import EVENTS_TOPIC
from servers.common.pagination import page
from servers.common.protos import struct
from servers.common.slots import StreamSlots

MAX_PATTERNS = 20
PATTERN = re.compile(r"[A-Za-z0-9_.*-]{1,64}\Z")
QUEUE_LIMIT = 10_000
# Open event streams per user in one process by default (AGENTMESH_EVENT_STREAMS_PER_USER); one
# more is 429 RATE_LIMIT_EXCEEDED.
STREAMS_PER_USER = 20
REPLAY_PAGE = 500
LIST_SCAN_PAGE = 1000
# A list or a replay reads every retained event after its start of those the caller may see:
# its own (the bus's index of the owner's events), or for an admin everyone's (100,000 by
# default). That costs 1.5 ms of CPU per 1,000 on the in-process bus, 5.5 ms on Redis. Each
# SCAN_COST read count as one more call against the caller's quota, so that no caller can keep
# a server busy with full scans while within its quota.
SCAN_COST = 1000
# Bytes of SSE frames sent as one chunk when events come in a burst.
SSE_CHUNK = 256 * 1024
# A stream that sent within BUSY seconds waits LINGER seconds for more before the next write.
BUSY, LINGER = 0.05, 0.01
# How long a stream's end waits for its credential check to stop (servers/common/jobs.py).
GUARD_PATIENCE = 5.0
# What a browser waits before reconnecting a dropped stream.
SSE_RETRY_MS = 2000


@dataclass(eq=False)
class Parsed:
    """A bus entry of the events topic, parsed once per process however many subscribe."""

    entry: Entry
    key: tuple[int, int]
    type: str
    subject: str
    owner: str

    @classmethod
    def of(cls, entry: Entry) -> Parsed:
        f = entry.fields
        return cls(
            entry=entry,
            key=parse_id(entry.id),
            type=f.get("type", ""),
            subject=f.get("subject", ""),
            owner=f.get("owner", ""),
        )

    @cached_property
    def proto(self) -> events_pb2.Event:
        f = self.entry.fields
        event = events_pb2.Event(
            event_id=self.entry.id,
            event_type=self.type,
            subject_id=self.subject,
            owner_id=self.owner,
        )
        with contextlib.suppress(ValueError, TypeError):
            event.data.CopyFrom(struct(json.loads(f.get("data", "{}"))))
        with contextlib.suppress(ValueError):
            event.timestamp.FromDatetime(datetime.fromisoformat(f.get("time", "")))
        return event

    @cached_property
    def sse(self) -> str:
        return sse.frame("message", self.proto, event_id=self.entry.id)


@dataclass(frozen=True)
class Filter:
    """Which events a subscriber receives: its own (all for admins), of the given types."""

    viewer: str
    admin: bool
    patterns: re.Pattern[str] | None
    subject: str

    @classmethod
    def build(cls, who: Principal, patterns: Sequence[str], subject: str) -> Filter:
        if len(patterns) > MAX_PATTERNS:
            raise ValidationError(f"at most {MAX_PATTERNS} patterns", details={"field": "patterns"})
        for pattern in patterns:
            if not PATTERN.match(pattern):
                raise ValidationError(
                    "a pattern is 1-64 characters of letters, digits, '.', '_', '-' and '*'",
                    details={"field": "patterns", "pattern": pattern[:64]},
                )
        if len(subject) > 64:
            raise ValidationError("subject_id is too long", details={"field": "subject_id"})
        compiled = (
            re.compile(
                "|".join(".*".join(map(re.escape, p.split("*"))) for p in patterns), re.ASCII
            )
            if patterns
            else None
        )
        return cls(
            viewer=who.subject, admin="admin" in who.roles, patterns=compiled, subject=subject
        )

    @property
    def topic(self) -> str:
        """Where the events this filter may pass are read from: the viewer's own index, or
        for an admin the whole topic."""
        return EVENTS_TOPIC if self.admin else owner_index(EVENTS_TOPIC, self.viewer)

    def __call__(self, event: Parsed) -> bool:
        if not self.admin and event.owner != self.viewer:
            return False
        if self.subject and event.subject != self.subject:
            return False
        return self.patterns is None or self.patterns.fullmatch(event.type) is not None


def _still_admin(check: CredentialCheck | None, matches: Filter) -> CredentialCheck | None:
    """``check``, and for a stream of everyone's events, that its caller is still an admin. A
    token loses its roles with the change, but an API key holds and follows its owner's:
    without this, a demoted admin's key went on streaming every user's events."""
    if check is None or not matches.admin:
        return check

    async def checked() -> object:
        who = await check()
        if "admin" not in getattr(who, "roles", ()):
            raise PermissionDenied(
                "your roles changed: this stream showed every user's events; open a new one",
                details={"rpc": "agentmesh.v1.EventsService"},
            )
        return who

    return checked


def resume_point(after: str) -> str:
    """A validated resume id ("" for none)."""
    if not after:
        return ""
    try:
        parse_id(after)
    except ValueError:
        raise ValidationError(
            "after must be an event_id as the stream sent it", details={"field": "after"}
        ) from None
    return after


@dataclass(eq=False)
class Subscription:
    matches: Filter
    limit: int
    queue: deque[Parsed] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    overflowed: bool = False
    ended: str = ""
    # The stream's credential stopped holding: its last frame.
    refused: common_pb2.StreamError | None = None

    def offer(self, event: Parsed) -> None:
        if self.overflowed or not self.matches(event):
            return
        if len(self.queue) >= self.limit:
            self.overflowed = True
            self.queue.clear()  # nothing more is kept for a consumer that fell this far behind
        else:
            self.queue.append(event)
        self.wake.set()

    def end(self, reason: str) -> None:
        self.ended = reason
        self.wake.set()

    def refuse(self, exc: AuthRequired | PermissionDenied) -> None:
        self.refused = common_pb2.StreamError(code=exc.reason, message=exc.message)
        self.wake.set()


class EventHub:
    """The process's subscriptions, fed by one follower of the events topic."""

    def __init__(self, follower: Follower) -> None:
        self.follower = follower
        self._subs: set[Subscription] = set()
        self._closed = False
        follower.listen(self._dispatch)

    def _dispatch(self, entry: Entry) -> None:
        if not self._subs:
            return
        try:
            event = Parsed.of(entry)
        except ValueError:
            return
        for sub in self._subs:
            sub.offer(event)

    def add(self, sub: Subscription) -> Callable[[], None]:
        if self._closed:
            sub.end("SERVER_SHUTDOWN")
        self._subs.add(sub)
        return lambda: self._subs.discard(sub)

    def shutdown(self) -> None:
        self._closed = True
        for sub in self._subs:
            sub.end("SERVER_SHUTDOWN")


Frame: TypeAlias = (
    list[Parsed] | common_pb2.Heartbeat | common_pb2.StreamError | common_pb2.StreamEnd
)


class EventsService(events_pb2_grpc.EventsServiceServicer):
    def __init__(
        self,
        *,
        bus: Bus,
        hub: EventHub,
        heartbeat_seconds: float,
        queue_limit: int = QUEUE_LIMIT,
        streams_per_user: int = STREAMS_PER_USER,
        authenticator: Authenticator | None = None,
    ) -> None:
        self._bus = bus
        # Checks again, every heartbeat interval, the credential an open stream came with.
        self._authenticator = authenticator
        self._slots = StreamSlots(streams_per_user, "event streams per user")
        self._hub = hub
        self._heartbeat = heartbeat_seconds
        self._queue_limit = queue_limit

    async def _frames(self, matches: Filter, after: str) -> AsyncIterator[Frame]:
        """Batches of events for one subscriber, heartbeats when idle, and a last frame."""
        sub = Subscription(matches, self._queue_limit)
        remove = self._hub.add(sub)
        check = _still_admin(current_call_check(self._authenticator), matches)
        guard = asyncio.create_task(guard_stream(check, self._heartbeat, sub.refuse))
        try:
            sent_at, last = 0.0, (0, 0)
            if after:
                try:
                    # An id past the newest event (another mesh's, or made up) would hold
                    # back every live event until its time: the stream goes on from now.
                    newest = await self._bus.last_id(EVENTS_TOPIC)
                    if parse_id(after) > parse_id(newest):
                        after = newest
                    last = parse_id(after)
                    async for batch, position in self._replay(sub, after):
                        last = position
                        yield batch
                except BusUnavailable:
                    yield common_pb2.StreamError(
                        code="SERVICE_UNAVAILABLE",
                        message="the event bus is unavailable; resume later from the last id",
                    )
                    return
            while True:
                if sub.refused is not None:
                    yield sub.refused
                    return
                if sub.ended:
                    yield common_pb2.StreamEnd(reason=sub.ended)
                    return
                if sub.overflowed:
                    yield common_pb2.StreamError(
                        code="SLOW_CONSUMER",
                        message=(
                            f"more than {self._queue_limit} events behind; resume from the "
                            "last event id received"
                        ),
                    )
                    return
                if not sub.queue:
                    sub.wake.clear()
                    try:
                        async with asyncio.timeout(self._heartbeat):
                            await sub.wake.wait()
                    except TimeoutError:
                        beat = common_pb2.Heartbeat()
                        beat.time.GetCurrentTime()
                        yield beat
                    continue
                if time.monotonic() - sent_at < BUSY:
                    # Events are flowing: gather a few more into this write. Each write is a
                    # gRPC message and an HTTP chunk per subscriber, the cost that grows with
                    # the subscribers; a few milliseconds of latency buys far fewer of them.
                    await asyncio.sleep(LINGER)
                batch = [e for e in _drain(sub.queue) if e.key > last]
                if batch:
                    last = batch[-1].key
                    sent_at = time.monotonic()
                    yield batch
        finally:
            remove()
            await stop_jobs((guard,), patience=GUARD_PATIENCE)

    async def _replay(
        self, sub: Subscription, after: str
    ) -> AsyncIterator[tuple[list[Parsed], tuple[int, int]]]:
        """The retained events after ``after`` that match, page by page, read from the bus.
        Runs until it has caught up with what the hub delivers live."""
        position = after
        scanned = 0
        while True:
            entries = await self._bus.range(sub.matches.topic, position, REPLAY_PAGE)
            if entries:
                position = entries[-1].id
                add_cost((scanned + len(entries)) // SCAN_COST - scanned // SCAN_COST)
                scanned += len(entries)
                batch = [e for e in map(Parsed.of, entries) if sub.matches(e)]
                yield batch, parse_id(position)
                continue
            if not sub.overflowed:
                return
            # The live queue overflowed while replaying; what it dropped is still on the bus.
            sub.overflowed = False
            sub.queue.clear()

    def _filter(self, patterns: Sequence[str], subject: str) -> Filter:
        return Filter.build(require_principal(), patterns, subject)

    async def Subscribe(
        self, request: events_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.SubscribeResponse]:
        matches = self._filter(request.patterns, request.subject_id)
        after = resume_point(request.after)
        with self._slots.take(require_principal().subject):
            async for frame in self._frames(matches, after):
                if isinstance(frame, list):
                    for event in frame:
                        yield events_pb2.SubscribeResponse(event=event.proto)
                elif isinstance(frame, common_pb2.Heartbeat):
                    yield events_pb2.SubscribeResponse(heartbeat=frame)
                elif isinstance(frame, common_pb2.StreamError):
                    yield events_pb2.SubscribeResponse(error=frame)
                else:
                    yield events_pb2.SubscribeResponse(end=frame)

    async def StreamEvents(
        self, request: events_pb2.StreamEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        matches = self._filter(request.patterns, request.subject_id)
        call = current_call()
        last_event_id = call.metadata.get(sse.LAST_EVENT_ID, "") if call else ""
        after = resume_point(last_event_id.strip() or request.after)
        with self._slots.take(require_principal().subject):
            yield sse.body(sse.retry(SSE_RETRY_MS))
            async for frame in self._frames(matches, after):
                if isinstance(frame, list):
                    for chunk in _chunks(frame):
                        yield sse.body(chunk)
                elif isinstance(frame, common_pb2.Heartbeat):
                    yield sse.body(sse.frame("ping", frame))
                elif isinstance(frame, common_pb2.StreamError):
                    yield sse.body(sse.frame("error", frame))
                else:
                    yield sse.body(sse.frame("end", frame))

    async def ListEvents(
        self, request: events_pb2.ListEventsRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.ListEventsResponse:
        matches = self._filter(request.patterns, request.subject_id)
        p = page(request.limit, request.offset)
        position = resume_point(request.after) or "0-0"
        found: list[Parsed] = []
        total = scanned = 0
        try:
            while entries := await self._bus.range(matches.topic, position, LIST_SCAN_PAGE):
                position = entries[-1].id
                scanned += len(entries)
                for event in map(Parsed.of, entries):
                    if matches(event):
                        if p.offset <= total < p.offset + p.limit:
                            found.append(event)
                        total += 1
        except BusUnavailable:
            raise Unavailable("the event bus is unavailable; try again shortly") from None
        finally:
            add_cost(scanned // SCAN_COST)
        events, served = p.fit([e.proto for e in found])
        return events_pb2.ListEventsResponse(events=events, **served.fields(total))


def _drain(queue: deque[Parsed]) -> list[Parsed]:
    items = list(queue)
    queue.clear()
    return items


def _chunks(events: list[Parsed]) -> list[str]:
    """SSE frames joined into chunks of about SSE_CHUNK bytes: one write per burst."""
    chunks: list[str] = []
    parts: list[str] = []
    size = 0
    for event in events:
        text = event.sse
        parts.append(text)
        size += len(text)
        if size >= SSE_CHUNK:
            chunks.append("".join(parts))
            parts, size = [], 0
    if parts:
        chunks.append("".join(parts))
    return chunks
