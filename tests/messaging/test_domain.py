"""The messaging domain on each database, with the real bus, follower and hub: idempotent
sends, limits, acknowledgement, inbox streams, request/response and expiry.

Agents are given as AgentRef here: who they are is the agents service's answer, which the e2e
tests (tests/e2e/test_messaging.py) take from the real service."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio as redis
from sqlalchemy import update

from servers.common.bus import Bus
from servers.common.clock import aware, now
from servers.common.db import Database
from servers.common.errors import (
    AlreadyExists,
    Conflict,
    DeadlineExceeded,
    NotFound,
    PermissionDenied,
    RateLimited,
    ValidationError,
)
from servers.common.follower import Follower
from servers.common.membus import MemoryBus
from servers.common.pagination import Page, page
from servers.common.ratelimit import SlidingWindowLimiter
from servers.mesh import MIGRATIONS
from servers.messaging import domain
from servers.messaging.domain import PAYLOAD_MAX_BYTES, AgentRef, Messages, NewMessage
from servers.messaging.hub import TOPIC, InboxHub
from servers.messaging.models import MessageRow
from servers.messaging.resolver import choose_sender
from servers.messaging.store import MessageStore
from servers.messaging.stream import Ended, Failed, Frame, InboxStream, Ping
from tests.conftest import _unavailable

ALICE = AgentRef("agent-alice", "user-1")
BOB = AgentRef("agent-bob", "user-2")
CAROL = AgentRef("agent-carol", "user-2")
REDIS_URL = os.environ.get("AGENTMESH_TEST_REDIS", "redis://127.0.0.1:6379/0")


def to(agent: AgentRef, **fields: object) -> NewMessage:
    return replace(NewMessage(to_agent=agent.agent_id, type="event", payload={"n": 1}), **fields)  # type: ignore[arg-type]


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Database]:
    db = Database(url)
    try:
        for service, folder in MIGRATIONS.items():
            if folder is not None:
                await db.migrate(service, folder)
        yield db
    finally:
        await db.close()


async def _cancel(task: asyncio.Future[None]) -> None:
    # MemoryBus.read waits with asyncio.wait_for, which on Python 3.11 may swallow a
    # cancellation that arrives together with an entry: ask again until the task ends.
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)


@asynccontextmanager
async def process(
    db: Database, bus: Bus, *, limit: int = 1000, **options: object
) -> AsyncIterator[Messages]:
    """What one messaging server holds: a follower of the topic, the hub, the domain."""
    follower = Follower(bus, TOPIC, block=0.2)
    running = asyncio.ensure_future(follower.run())
    await asyncio.wait_for(follower.started.wait(), 5)
    hub = InboxHub(bus=bus, follower=follower)
    hub.start()
    limiter = SlidingWindowLimiter(name=f"t-{uuid.uuid4().hex}", limit=limit, window=1.0)
    try:
        yield Messages(db=db, hub=hub, limiter=limiter, **options)  # type: ignore[arg-type]
    finally:
        hub.stop()
        await _cancel(running)
        await limiter.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    async with opened(database_url) as db:
        yield db


@pytest.fixture
async def messages(db: Database) -> AsyncIterator[Messages]:
    bus = MemoryBus()
    async with process(db, bus, poll_seconds=10.0) as messages:
        yield messages
    await bus.close()


class Reader:
    """Reads an inbox stream in the background, as a servicer would."""

    def __init__(self, stream: InboxStream) -> None:
        self.frames: asyncio.Queue[Frame] = asyncio.Queue()
        self._iter = stream.frames()
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for frame in self._iter:
            await self.frames.put(frame)

    async def next(self, timeout: float = 3.0) -> Frame:
        return await asyncio.wait_for(self.frames.get(), timeout)

    async def message(self, timeout: float = 3.0) -> MessageRow:
        while True:
            frame = await self.next(timeout)
            if isinstance(frame, MessageRow):
                return frame
            assert isinstance(frame, Ping), frame

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._iter.aclose()


def stream(messages: Messages, agent: AgentRef, **options: object) -> InboxStream:
    opts: dict[str, object] = {"heartbeat": 10.0, "closing": asyncio.Event()} | options
    return InboxStream(messages, agent.agent_id, **opts)  # type: ignore[arg-type]


async def test_a_repeated_message_id_is_one_message(messages: Messages) -> None:
    first, created = await messages.send(ALICE, BOB, to(BOB, message_id="msg-1"))
    assert created and first.message_id == "msg-1" and first.from_agent == ALICE.agent_id
    again, created = await messages.send(ALICE, BOB, to(BOB, message_id="msg-1"))
    assert not created and again.seq == first.seq
    # The same id from another agent is a clash, not a repeat.
    with pytest.raises(AlreadyExists):
        await messages.send(CAROL, BOB, to(BOB, message_id="msg-1"))
    # Concurrent repeats store one message.
    results = await asyncio.gather(
        *(messages.send(ALICE, BOB, to(BOB, message_id="msg-2")) for _ in range(8))
    )
    assert len({row.seq for row, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    rows, total, _ = await messages.inbox(BOB.agent_id, unacked=False, page=page(0, 0))
    assert total == 2 and [r.message_id for r in rows] == ["msg-1", "msg-2"]
    # A generated id, the default TTL.
    row, _ = await messages.send(ALICE, BOB, to(BOB))
    assert row.message_id.startswith("msg-") and row.ttl_seconds == 3600


async def test_a_page_of_large_messages_is_cut_before_it_is_read(
    messages: Messages, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database sizes the page's payloads first: the rows past the budget (after the
    first) are never loaded, and the page says where the next one starts."""
    monkeypatch.setattr(domain, "PAGE_MAX_BYTES", 1000)
    sent = []
    for n in range(5):  # about 400 characters of payload each
        row, _ = await messages.send(ALICE, BOB, to(BOB, payload={"t": f"{n}" * 395}))
        sent.append(row.message_id)
    rows, total, served = await messages.inbox(BOB.agent_id, unacked=False, page=page(10, 0))
    # About 0, 400 and 800 characters come before the first three; 1,200 before the fourth.
    assert [r.message_id for r in rows] == sent[:3] and total == 5
    assert served == Page(limit=3, offset=0)
    rows, _, served = await messages.inbox(BOB.agent_id, unacked=False, page=page(10, 3))
    assert [r.message_id for r in rows] == sent[3:] and served == Page(limit=10, offset=3)
    monkeypatch.setattr(domain, "PAGE_MAX_BYTES", 0)  # one message, however large
    rows, _, served = await messages.inbox(BOB.agent_id, unacked=True, page=page(10, 1))
    assert [r.message_id for r in rows] == sent[1:2] and served == Page(limit=1, offset=1)


@pytest.mark.parametrize(
    "fields",
    [
        {"type": "gossip"},
        {"to_agent": ""},
        {"ttl_seconds": 86_401},
        {"ttl_seconds": -1},
        {"message_id": "has space"},
        {"message_id": "x" * 129},
        {"message_id": "ends-a-line\n"},  # an SSE id: line, and what follows it
        {"correlation_id": "c\n", "type": "response"},
        {"type": "response"},  # without a correlation_id
        {"payload": {"blob": "x" * PAYLOAD_MAX_BYTES}},
        {"payload": {"a": [[[[[[[[[[[[[[[[[[[[{}]]]]]]]]]]]]]]]]]]]]}},  # 22 levels
    ],
)
async def test_invalid_messages_are_refused(messages: Messages, fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        await messages.send(ALICE, BOB, replace(to(BOB), **fields))  # type: ignore[arg-type]


async def test_rate_limit_and_full_inbox(db: Database) -> None:
    bus = MemoryBus()
    async with process(db, bus, limit=3, max_unacked=5) as messages:
        for _ in range(3):
            await messages.send(ALICE, BOB, to(BOB))
        with pytest.raises(RateLimited) as limited:
            await messages.send(ALICE, BOB, to(BOB))
        assert limited.value.reason == "RATE_LIMIT_EXCEEDED"
        assert int(limited.value.details["retry_after"]) >= 1
        # The limit is per sender.
        await messages.send(CAROL, BOB, to(BOB))
        await messages.send(CAROL, BOB, to(BOB))
        with pytest.raises(RateLimited) as full:
            await messages.send(CAROL, BOB, to(BOB))
        assert full.value.reason == "INBOX_FULL"
        assert full.value.details["max_unacked"] == "5"
        # Acknowledging makes room.
        rows, _, _ = await messages.inbox(BOB.agent_id, unacked=True, page=page(1, 0))
        await messages.ack({BOB.agent_id}, rows[0].message_id)
        await messages.send(AgentRef("agent-dave", "user-3"), BOB, to(BOB))
    await bus.close()


async def test_concurrent_senders_cannot_pass_a_full_inbox(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each send pauses between its count of the inbox and its INSERT: without turns taken
    (PostgreSQL), every sender would count the same empty inbox and all would get in."""
    original = MessageStore.unacked_count

    async def slow_count(self: MessageStore, *args: object, **kw: int) -> int:
        held = await original(self, *args, **kw)  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        return held

    monkeypatch.setattr(MessageStore, "unacked_count", slow_count)
    bus = MemoryBus()
    senders = [AgentRef(f"agent-{n}", "user-1") for n in range(6)]
    async with process(db, bus, max_unacked=2) as messages:
        sent = await asyncio.gather(
            *(messages.send(sender, BOB, to(BOB)) for sender in senders), return_exceptions=True
        )
        rows, total, _ = await messages.inbox(BOB.agent_id, unacked=True, page=page(10, 0))
    await bus.close()
    refused = [r for r in sent if isinstance(r, RateLimited)]
    assert len(sent) - len(refused) == 2 and total == len(rows) == 2
    assert {r.reason for r in refused} == {"INBOX_FULL"}


async def test_ack_and_listing(messages: Messages) -> None:
    sent = [(await messages.send(ALICE, BOB, to(BOB, message_id=f"m-{i}")))[0] for i in range(5)]
    acked = await messages.ack({BOB.agent_id}, "m-1")
    assert acked.acked_at is not None
    # Twice answers the same time (SQLite gives it back without its zone: compare as UTC).
    again = (await messages.ack({BOB.agent_id}, "m-1")).acked_at
    assert again is not None and aware(again) == aware(acked.acked_at)
    # Only the recipient acknowledges; anyone else meets NOT_FOUND, as for an unknown id.
    for agents, message_id in (({ALICE.agent_id}, "m-2"), ({BOB.agent_id}, "nope"), (set(), "m-2")):
        with pytest.raises(NotFound):
            await messages.ack(agents, message_id)
    rows, total, _ = await messages.inbox(BOB.agent_id, unacked=False, page=page(2, 1))
    assert total == 5 and [r.message_id for r in rows] == ["m-1", "m-2"]
    rows, total, _ = await messages.inbox(BOB.agent_id, unacked=True, page=page(0, 0))
    assert total == 4 and [r.message_id for r in rows] == ["m-0", "m-2", "m-3", "m-4"]
    assert page(2, 1).has_more(5)
    assert (await messages.inbox(ALICE.agent_id, unacked=False, page=page(0, 0)))[1] == 0
    assert len(sent) == 5


async def test_two_acks_at_once_both_answer_the_recorded_time(
    messages: Messages, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second ack commits between the first's read and its UPDATE (PostgreSQL): the first
    must still answer the message acknowledged, at the time the second recorded."""
    await messages.send(ALICE, BOB, to(BOB, message_id="m-1"))
    original, paused = MessageStore.get, asyncio.Event()

    async def slow_get(self: MessageStore, message_id: str, **kw: bool) -> MessageRow | None:
        row = await original(self, message_id, **kw)
        if not paused.is_set():
            paused.set()
            await asyncio.sleep(0.3)
        return row

    monkeypatch.setattr(MessageStore, "get", slow_get)
    first = asyncio.ensure_future(messages.ack({BOB.agent_id}, "m-1"))
    await paused.wait()
    second = await messages.ack({BOB.agent_id}, "m-1")
    answered = await first
    assert second.acked_at is not None and answered.acked_at is not None
    assert aware(answered.acked_at) == aware(second.acked_at)


async def test_a_stream_sends_the_backlog_then_new_messages_then_redelivers(
    messages: Messages,
) -> None:
    for i in range(3):
        await messages.send(ALICE, BOB, to(BOB, message_id=f"old-{i}"))
    reader = Reader(stream(messages, BOB))
    try:
        assert [(await reader.message()).message_id for _ in range(3)] == [
            "old-0",
            "old-1",
            "old-2",
        ]
        started = time.monotonic()
        await messages.send(ALICE, BOB, to(BOB, message_id="new-0"))
        assert (await reader.message()).message_id == "new-0"
        # Woken by the hub, not found by the 10 s poll.
        assert time.monotonic() - started < 1.0
        await messages.ack({BOB.agent_id}, "old-0")
        await messages.ack({BOB.agent_id}, "new-0")
        # Nothing is sent twice on one stream.
        with pytest.raises(TimeoutError):
            await reader.message(timeout=0.3)
    finally:
        await reader.close()
    # A new connection gets what was not acknowledged, oldest first.
    again = Reader(stream(messages, BOB))
    try:
        assert [(await again.message()).message_id for _ in range(2)] == ["old-1", "old-2"]
    finally:
        await again.close()


async def test_heartbeats_and_shutdown(messages: Messages) -> None:
    closing = asyncio.Event()
    reader = Reader(stream(messages, BOB, heartbeat=0.1, closing=closing))
    try:
        assert isinstance(await reader.next(), Ping)
        assert isinstance(await reader.next(), Ping)
        closing.set()
        while not isinstance(frame := await reader.next(), Ended):
            assert isinstance(frame, Ping)
        assert frame.reason == "SERVER_SHUTDOWN"
    finally:
        await reader.close()


async def test_a_consumer_that_falls_behind_is_cut_off(messages: Messages) -> None:
    inbox = stream(messages, BOB, queue_size=2, slow_after=0.3, heartbeat=0.1)
    frames = inbox.frames()
    try:
        await messages.send(ALICE, BOB, to(BOB, message_id="s-0"))
        first = await asyncio.wait_for(anext(frames), 3)
        assert isinstance(first, MessageRow) and first.message_id == "s-0"
        for i in range(1, 6):
            await messages.send(ALICE, BOB, to(BOB, message_id=f"s-{i}"))
        await asyncio.sleep(0.8)  # the agent takes nothing while its queue is full
        last = await asyncio.wait_for(anext(frames), 3)
        assert isinstance(last, Failed) and last.code == "SLOW_CONSUMER"
        with pytest.raises(StopAsyncIteration):
            await anext(frames)
    finally:
        await frames.aclose()
    # Nothing was lost: every message is still unacknowledged, for the next connection.
    _, total, _ = await messages.inbox(BOB.agent_id, unacked=True, page=page(0, 0))
    assert total == 6


async def test_a_slow_but_steady_consumer_gets_the_whole_backlog(messages: Messages) -> None:
    for i in range(7):
        await messages.send(ALICE, BOB, to(BOB, message_id=f"b-{i}"))
    reader = Reader(stream(messages, BOB, queue_size=2, slow_after=5.0))
    try:
        got = [(await reader.message()).message_id for _ in range(7)]
        assert got == [f"b-{i}" for i in range(7)]
    finally:
        await reader.close()


async def test_a_backlog_is_read_once_however_often_the_queue_refills(
    messages: Messages, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refill of a stream that fell behind read the backlog from its start again: 10,000
    waiting messages went out at 650/s, then 120/s. A refill goes on where the last stopped."""
    for i in range(300):
        await messages.send(ALICE, BOB, to(BOB, message_id=f"r-{i:03}"))
    read = 0
    original = MessageStore.deliverable

    async def counted(self: MessageStore, *args: Any, **kw: Any) -> Sequence[MessageRow]:
        nonlocal read
        rows = await original(self, *args, **kw)
        read += len(rows)
        return rows

    monkeypatch.setattr(MessageStore, "deliverable", counted)
    reader = Reader(stream(messages, BOB, queue_size=10, slow_after=10.0))
    try:
        got = [(await reader.message()).message_id for _ in range(300)]
        assert got == [f"r-{i:03}" for i in range(300)]
        # Once to go through it, and once more from before the catch-up began, for a message
        # that committed behind it; from the start on each of 30 refills it was 4,500.
        assert read <= 2 * 300 + 100, read
    finally:
        await reader.close()


async def test_a_stream_keeps_send_order_while_it_falls_behind_and_catches_up(
    messages: Messages,
) -> None:
    # A queue of 3 makes the stream fall behind and read back from the database, while
    # messages stored meanwhile are offered to it directly: none may overtake an older one.
    reader = Reader(stream(messages, BOB, queue_size=3, slow_after=10.0))
    await asyncio.sleep(0.1)  # the first read is done
    sent = [f"o-{i}" for i in range(40)]

    async def sender() -> None:
        for i, message_id in enumerate(sent):
            await messages.send(ALICE, BOB, to(BOB, message_id=message_id))
            if i % 7 == 0:
                await asyncio.sleep(0.01)

    try:
        sending = asyncio.ensure_future(sender())
        got = []
        for _ in sent:
            got.append((await reader.message()).message_id)
            if len(got) % 5 == 0:
                await asyncio.sleep(0.02)  # a slow agent
        await sending
        assert got == sent
        with pytest.raises(TimeoutError):  # and none twice
            await reader.message(timeout=0.3)
    finally:
        await reader.close()


async def test_a_new_message_waits_behind_the_backlog_of_a_stream_that_fell_behind(
    messages: Messages,
) -> None:
    inbox = stream(messages, BOB, queue_size=2, slow_after=10.0)
    frames = inbox.frames()
    try:
        await messages.send(ALICE, BOB, to(BOB, message_id="q-0"))
        first = await asyncio.wait_for(anext(frames), 3)
        assert isinstance(first, MessageRow) and first.message_id == "q-0"
        for i in range(1, 6):
            await messages.send(ALICE, BOB, to(BOB, message_id=f"q-{i}"))
        await asyncio.sleep(0.2)  # the stream has read what fits and knows it is behind
        got: list[str] = []
        while len(got) < 6:
            # In this task, not wait_for's: nothing else runs between the frame and the send.
            frame = await anext(frames)
            assert isinstance(frame, MessageRow)
            got.append(frame.message_id)
            if len(got) == 1:
                # Sent as soon as the queue has room again, before the stream reads back.
                await messages.send(ALICE, BOB, to(BOB, message_id="late"))
        assert got == ["q-1", "q-2", "q-3", "q-4", "q-5", "late"]
    finally:
        await frames.aclose()


async def test_request_and_response(messages: Messages) -> None:
    responder = Reader(stream(messages, BOB))
    requester_inbox = Reader(stream(messages, ALICE))

    async def answer() -> None:
        request = await responder.message()
        await messages.send(
            BOB,
            ALICE,
            to(ALICE, correlation_id=request.correlation_id, payload={"ok": True}, type="response"),
        )

    try:
        answering = asyncio.ensure_future(answer())
        started = time.monotonic()
        request, response = await messages.request(ALICE, BOB, to(BOB, payload={"q": 1}), wait=5.0)
        elapsed = time.monotonic() - started
        await answering
        assert request.type == "request" and request.correlation_id.startswith("corr-")
        assert response.correlation_id == request.correlation_id
        assert response.payload == {"ok": True} and response.acked_at is not None
        assert elapsed < 1.0
        # The response went to the waiter, not also to the requester's inbox stream.
        with pytest.raises(TimeoutError):
            await requester_inbox.message(timeout=0.3)
        # Answering acknowledged the request: it is not delivered to the responder again.
        unacked, _, _ = await messages.inbox(BOB.agent_id, unacked=True, page=page(0, 0))
        assert unacked == []
    finally:
        await responder.close()
        await requester_inbox.close()


async def test_only_the_recipient_of_a_request_can_answer_it(messages: Messages) -> None:
    """A response from any other agent, with the request's correlation id (guessable, or
    chosen by the requester), is not the answer: it waits in the requester's inbox as any
    message does, and the request stays unanswered for its recipient."""
    responder = Reader(stream(messages, BOB))
    requester_inbox = Reader(stream(messages, ALICE))

    async def spoof_then_answer() -> None:
        request = await responder.message()
        # Carol (another agent, of another owner than Alice) sends a "response" first.
        await messages.send(
            CAROL,
            ALICE,
            to(ALICE, correlation_id=request.correlation_id, payload={"x": 1}, type="response"),
        )
        # It reaches Alice's inbox stream at once, not when her wait ends.
        spoofed = await requester_inbox.message(timeout=1.0)
        assert (spoofed.from_agent, spoofed.payload) == (CAROL.agent_id, {"x": 1})
        unacked, _, _ = await messages.inbox(BOB.agent_id, unacked=True, page=page(0, 0))
        assert [m.message_id for m in unacked] == [request.message_id]  # still to answer
        await messages.send(
            BOB,
            ALICE,
            to(ALICE, correlation_id=request.correlation_id, payload={"ok": 1}, type="response"),
        )

    try:
        answering = asyncio.ensure_future(spoof_then_answer())
        request, response = await messages.request(
            ALICE, BOB, to(BOB, correlation_id="c-spoof"), wait=5.0
        )
        await answering
        assert response.from_agent == BOB.agent_id and response.payload == {"ok": 1}
        # The spoofed one sits unacknowledged in Alice's inbox, for her to judge.
        rows, _, _ = await messages.inbox(ALICE.agent_id, unacked=True, page=page(0, 0))
        assert [(r.from_agent, r.payload) for r in rows] == [(CAROL.agent_id, {"x": 1})]
        # A second response from Bob, after the answer, goes to her stream at once too.
        await messages.send(
            BOB, ALICE, to(ALICE, correlation_id="c-spoof", payload={"again": 1}, type="response")
        )
        second = await requester_inbox.message(timeout=1.0)
        assert (second.from_agent, second.payload) == (BOB.agent_id, {"again": 1})
    finally:
        await responder.close()
        await requester_inbox.close()


async def test_a_request_without_answer_times_out_and_a_late_answer_waits_in_the_inbox(
    messages: Messages,
) -> None:
    with pytest.raises(DeadlineExceeded) as late:
        await messages.request(ALICE, BOB, to(BOB, correlation_id="c-1"), wait=0.2)
    assert late.value.reason == "TIMEOUT_ERROR"
    assert late.value.details["correlation_id"] == "c-1"
    await messages.send(BOB, ALICE, to(ALICE, type="response", correlation_id="c-1"))
    rows, total, _ = await messages.inbox(ALICE.agent_id, unacked=True, page=page(0, 0))
    assert total == 1 and rows[0].correlation_id == "c-1"


async def test_a_response_whose_waiter_leaves_as_it_is_stored_goes_to_the_inbox(
    messages: Messages, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A response that a waiter here expects is stored acknowledged, for the waiter to take.
    # When the waiter is gone by the time the response is committed, it goes to the inbox.
    waiter = messages.hub.expect(ALICE.agent_id, "c-gone", BOB.agent_id)
    answered = MessageStore.ack_answered

    async def leave_meanwhile(store: MessageStore, response: MessageRow) -> None:
        waiter.close()
        await answered(store, response)

    monkeypatch.setattr(MessageStore, "ack_answered", leave_meanwhile)
    inbox = Reader(stream(messages, ALICE))
    try:
        sent, _ = await messages.send(
            BOB, ALICE, to(ALICE, type="response", correlation_id="c-gone")
        )
        assert sent.acked_at is None
        assert (await inbox.message()).message_id == sent.message_id
    finally:
        await inbox.close()
    rows, _, _ = await messages.inbox(ALICE.agent_id, unacked=True, page=page(0, 0))
    assert [r.message_id for r in rows] == [sent.message_id]


async def test_one_waiter_per_correlation_id(messages: Messages) -> None:
    waiting = asyncio.ensure_future(
        messages.request(ALICE, BOB, to(BOB, correlation_id="c-2"), wait=1.0)
    )
    await asyncio.sleep(0.1)
    with pytest.raises(Conflict):
        await messages.request(ALICE, BOB, to(BOB, correlation_id="c-2"), wait=1.0)
    # Another requester may use the same id.
    responder = asyncio.ensure_future(
        messages.request(CAROL, BOB, to(BOB, correlation_id="c-2"), wait=1.0)
    )
    await messages.send(BOB, ALICE, to(ALICE, type="response", correlation_id="c-2"))
    _, response = await waiting
    assert response.to_agent == ALICE.agent_id
    with pytest.raises(DeadlineExceeded):
        await responder


async def test_a_repeated_request_finds_the_response_that_came_meanwhile(
    messages: Messages,
) -> None:
    with pytest.raises(DeadlineExceeded):
        await messages.request(ALICE, BOB, to(BOB, message_id="req-9"), wait=0.1)
    rows, _, _ = await messages.inbox(BOB.agent_id, unacked=True, page=page(0, 0))
    correlation = rows[0].correlation_id
    await messages.send(BOB, ALICE, to(ALICE, type="response", correlation_id=correlation))
    request, response = await messages.request(ALICE, BOB, to(BOB, message_id="req-9"), wait=1.0)
    assert request.message_id == "req-9" and response.correlation_id == correlation


async def test_a_request_repeating_the_id_of_an_event_is_refused_not_left_waiting(
    messages: Messages,
) -> None:
    """It waited its whole timeout for a response to an event, which nothing can send."""
    await messages.send(ALICE, BOB, to(BOB, message_id="ev-1"))
    started = time.monotonic()
    with pytest.raises(AlreadyExists, match="not a request"):
        await messages.request(ALICE, BOB, to(BOB, message_id="ev-1"), wait=5.0)
    assert time.monotonic() - started < 1.0


async def test_expired_messages_are_neither_listed_nor_kept(
    messages: Messages, db: Database
) -> None:
    await messages.send(ALICE, BOB, to(BOB, message_id="old"))
    await messages.send(ALICE, BOB, to(BOB, message_id="fresh"))
    async with db.write() as s, s.begin():
        await s.execute(
            update(MessageRow)
            .where(MessageRow.message_id == "old")
            .values(expires_at=now() - timedelta(seconds=1))
        )
    rows, total, _ = await messages.inbox(BOB.agent_id, unacked=False, page=page(0, 0))
    assert [r.message_id for r in rows] == ["fresh"] and total == 1
    with pytest.raises(NotFound):
        await messages.ack({BOB.agent_id}, "old")
    assert await messages.sweep_once(batch=1) == 1
    assert await messages.sweep_once() == 0
    # The id is free again once the message is gone.
    _, created = await messages.send(CAROL, BOB, to(BOB, message_id="old"))
    assert created


async def test_resending_the_id_of_an_expired_message_sends_a_new_one(
    messages: Messages, db: Database
) -> None:
    """The expired message is gone (404 to ack, not listed) before the sweep deletes it; a
    resend of its id was answered with it, as a repeat, and nothing was delivered."""
    await messages.send(ALICE, BOB, to(BOB, message_id="again", payload={"n": 1}))
    async with db.write() as s, s.begin():
        await s.execute(
            update(MessageRow)
            .where(MessageRow.message_id == "again")
            .values(expires_at=now() - timedelta(seconds=1))
        )
    resent, created = await messages.send(ALICE, BOB, to(BOB, message_id="again", payload={"n": 2}))
    assert created and resent.payload == {"n": 2} and aware(resent.expires_at) > now()
    rows, _, _ = await messages.inbox(BOB.agent_id, unacked=True, page=page(0, 0))
    assert [(r.message_id, r.payload) for r in rows] == [("again", {"n": 2})]
    # Another sender may take an expired id too: it names no message any more.
    await messages.ack({BOB.agent_id}, "again")
    async with db.write() as s, s.begin():
        await s.execute(
            update(MessageRow)
            .where(MessageRow.message_id == "again")
            .values(expires_at=now() - timedelta(seconds=1))
        )
    _, created = await messages.send(CAROL, BOB, to(BOB, message_id="again"))
    assert created


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_send_in_one_process_wakes_a_stream_in_another(db: Database, kind: str) -> None:
    async with AsyncExitStack() as stack:
        if kind == "memory":
            shared = MemoryBus()
            buses: list[Bus] = [shared, shared]
        else:
            probe = redis.from_url(REDIS_URL, socket_connect_timeout=1)
            try:
                await probe.ping()
            except (redis.RedisError, OSError) as exc:
                _unavailable(f"Redis at {REDIS_URL}", exc)
            finally:
                await probe.aclose()
            from servers.common.redisbus import RedisBus

            prefix = f"agentmesh-test:{uuid.uuid4().hex}:"
            buses = [RedisBus(REDIS_URL, prefix=prefix), RedisBus(REDIS_URL, prefix=prefix)]
        for bus in buses:
            stack.push_async_callback(bus.close)
        here = await stack.enter_async_context(process(db, buses[0], poll_seconds=10.0))
        there = await stack.enter_async_context(process(db, buses[1], poll_seconds=10.0))
        reader = Reader(stream(there, BOB))
        stack.push_async_callback(reader.close)
        await asyncio.sleep(0.2)  # the stream's first read is done
        started = time.monotonic()
        await here.send(ALICE, BOB, to(BOB, message_id="far"))
        assert (await reader.message()).message_id == "far"
        assert time.monotonic() - started < 2.0  # the bus woke it, not the 10 s poll

        # A request waiting there gets the response sent here.
        waiting = asyncio.ensure_future(
            there.request(ALICE, BOB, to(BOB, correlation_id="x-1"), wait=5.0)
        )
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await here.send(BOB, ALICE, to(ALICE, type="response", correlation_id="x-1"))
        _, response = await waiting
        assert response.correlation_id == "x-1" and time.monotonic() - started < 2.0


def test_the_sender_is_chosen_from_the_keys_agents() -> None:
    assert choose_sender([ALICE], "") == ALICE
    assert choose_sender([ALICE], ALICE.agent_id) == ALICE
    assert choose_sender([ALICE, CAROL], CAROL.agent_id) == CAROL
    with pytest.raises(ValidationError):
        choose_sender([ALICE, CAROL], "")
    with pytest.raises(PermissionDenied):
        choose_sender([ALICE], BOB.agent_id)
    with pytest.raises(PermissionDenied):
        choose_sender([], "")
