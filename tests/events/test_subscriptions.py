"""EventsService subscriptions against a real grpc.aio server on a socket and the in-process
bus: a consumer that cannot keep up is cut off in-band and resumes without a gap, a long replay
is not mistaken for a slow consumer, and patterns mean what events.proto says.

The server is built in the test's own process (rather than `agentmesh up`) so the test can
publish tens of thousands of events straight onto the bus.

A scan of the retained events, by a list or a replay, counts against the caller's quota by its
length.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from agentmesh.v1 import events_pb2, events_pb2_grpc
from servers.auth.keys import SigningKey
from servers.common.auth import Authenticator, TokenVerifier
from servers.common.bus import owner_index
from servers.common.context import Principal
from servers.common.errors import ValidationError
from servers.common.follower import Follower
from servers.common.interceptors import default_interceptors
from servers.common.membus import MemoryBus
from servers.common.outbox import EVENTS_TOPIC
from servers.common.quotas import Quota, Quotas
from servers.messaging.events import EventHub, EventsService, Filter, Parsed, resume_point

RETENTION: dict[str, Any] = {"retention_ms": 3_600_000, "max_len": 1_000_000}
PADDING = "x" * 2000


@dataclass
class Rig:
    bus: MemoryBus
    hub: EventHub
    stub: events_pb2_grpc.EventsServiceStub
    metadata: tuple[tuple[str, str], ...]

    async def publish(
        self, count: int, owner: str = "u1", kind: str = "task.progress"
    ) -> list[str]:
        return [
            await self.bus.publish(
                EVENTS_TOPIC,
                {
                    "type": kind,
                    "subject": f"t{i}",
                    "owner": owner,
                    "time": "2026-11-23T00:00:00+00:00",
                    "data": f'{{"i": {i}, "pad": "{PADDING}"}}',
                },
                index=owner_index(EVENTS_TOPIC, owner),  # as the outbox relay does
                **RETENTION,
            )
            for i in range(count)
        ]


def _token(key: SigningKey, subject: str, lifetime: int = 600) -> str:
    now = int(time.time())
    claims = {
        "sub": subject,
        "iss": "agentmesh",
        "aud": "agentmesh",
        "iat": now,
        "exp": now + lifetime,
        "jti": f"j-{subject}",
        "typ": "access",
        "roles": ["user"],
    }
    return jwt.encode(claims, key.private_key, algorithm="ES256", headers={"kid": key.kid})


async def _no_api_keys(secret: str) -> Principal:
    raise AssertionError("these tests sign in with tokens only")


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with _rig(tmp_path) as built:
        yield built


@contextlib.asynccontextmanager
async def _rig(
    tmp_path: Path,
    quotas: Quotas | None = None,
    *,
    heartbeat: float = 30,
    token_lifetime: int = 600,
) -> AsyncIterator[Rig]:
    bus = MemoryBus()
    follower = Follower(bus, EVENTS_TOPIC)
    following = asyncio.create_task(follower.run())
    await follower.started.wait()
    hub = EventHub(follower)
    key = SigningKey.load_or_create(tmp_path)
    verifier = TokenVerifier(jwks=key.jwks, issuer="agentmesh", audience="agentmesh")
    authenticator = Authenticator(verifier=verifier, internal_token="t", api_keys=_no_api_keys)
    server = grpc.aio.server(interceptors=default_interceptors(authenticator, quotas=quotas))
    events_pb2_grpc.add_EventsServiceServicer_to_server(
        EventsService(
            bus=bus,
            hub=hub,
            heartbeat_seconds=heartbeat,
            queue_limit=50,
            authenticator=authenticator,
        ),
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Rig(
            bus=bus,
            hub=hub,
            stub=events_pb2_grpc.EventsServiceStub(channel),
            metadata=(("authorization", f"Bearer {_token(key, 'u1', token_lifetime)}"),),
        )
    finally:
        await channel.close()
        await server.stop(0)
        following.cancel()


async def test_a_consumer_that_falls_behind_is_cut_off_and_resumes_without_a_gap(
    rig: Rig,
) -> None:
    call = rig.stub.Subscribe(events_pb2.SubscribeRequest(), metadata=rig.metadata)
    while not rig.hub._subs:  # the stream is open once its subscription is
        await asyncio.sleep(0.01)
    # 5,000 events of 2 KB: far more than the transport buffers hold for a consumer that does
    # not read, so the server's queue for it (50 here) overflows.
    # It arrives steadily, a few events at a time, as a busy mesh produces it.
    published = []
    for _ in range(200):
        published += await rig.publish(25)
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.5)
    received: list[str] = []
    ending = None
    async for frame in call:
        if frame.HasField("event"):
            received.append(frame.event.event_id)
        elif frame.HasField("error"):
            ending = frame.error
            break
    assert ending is not None and ending.code == "SLOW_CONSUMER", ending
    assert "resume" in ending.message
    # What arrived is an unbroken run from the start: nothing was skipped before the cut.
    assert received == published[: len(received)]
    assert 0 < len(received) < len(published)
    # Nothing is held for it any more, and resuming from the last id it saw fills the gap.
    assert rig.hub._subs == set()
    resumed = rig.stub.Subscribe(
        events_pb2.SubscribeRequest(after=received[-1]), metadata=rig.metadata
    )
    rest: list[str] = []
    async for frame in resumed:
        if frame.HasField("event"):
            rest.append(frame.event.event_id)
        if len(received) + len(rest) == len(published):
            break
    resumed.cancel()
    assert received + rest == published


async def test_a_long_replay_is_not_a_slow_consumer(rig: Rig) -> None:
    published = await rig.publish(400)
    call = rig.stub.Subscribe(events_pb2.SubscribeRequest(after="0-0"), metadata=rig.metadata)
    more = asyncio.create_task(rig.publish(200))
    got: list[str] = []
    async for frame in call:
        assert not frame.HasField("error"), frame.error
        if frame.HasField("event"):
            got.append(frame.event.event_id)
        if len(got) == 600:
            break
    call.cancel()
    assert got == published + await more


async def test_subscribers_receive_only_their_own_events(rig: Rig) -> None:
    call = rig.stub.Subscribe(events_pb2.SubscribeRequest(after="0-0"), metadata=rig.metadata)
    others = await rig.publish(3, owner="someone-else")
    mine = await rig.publish(2)
    got = []
    async for frame in call:
        if frame.HasField("event"):
            got.append(frame.event.event_id)
            assert frame.event.owner_id == "u1"
        if len(got) == 2:
            break
    call.cancel()
    assert got == mine
    assert not set(got) & set(others)


async def test_a_resume_id_past_the_newest_event_goes_on_from_now(rig: Rig) -> None:
    """An id from the future (another mesh's, made up) held back every live event until its
    time, the year 2286 here, while the stream looked healthy."""
    await rig.publish(2)
    call = rig.stub.Subscribe(
        events_pb2.SubscribeRequest(after="9999999999999-0"), metadata=rig.metadata
    )
    await asyncio.sleep(0.2)  # the stream is open before the next event
    later = await rig.publish(1)
    async with asyncio.timeout(10):
        async for frame in call:
            assert not frame.HasField("error"), frame.error
            if frame.HasField("event"):
                assert [frame.event.event_id] == later
                break
    call.cancel()


@pytest.mark.parametrize("pattern", ["task.*\n", "task.\u0661", "a" * 64 + "\n"])
def test_a_pattern_is_ascii_and_nothing_after(pattern: str) -> None:
    user = Principal(subject="u1", kind="user", roles=("user",))
    with pytest.raises(ValidationError):
        Filter.build(user, [pattern], "")


@pytest.mark.parametrize(
    "after", ["1-0\n", "\u0661-0", "18446744073709551616-0", "1-18446744073709551616"]
)
def test_a_resume_id_redis_would_refuse_is_a_validation_error(after: str) -> None:
    """On Redis these were sent to the bus, which refused them: 503 "the event bus is
    unavailable", and an EventSource resuming with one retried for ever."""
    with pytest.raises(ValidationError):
        resume_point(after)
    assert resume_point("18446744073709551615-18446744073709551615")


def _parsed(event_type: str, owner: str = "u1", subject: str = "s") -> Parsed:
    from servers.common.bus import Entry

    return Parsed.of(Entry("1-0", {"type": event_type, "owner": owner, "subject": subject}))


@pytest.mark.parametrize(
    ("patterns", "matching", "not_matching"),
    [
        (["task.*"], ["task.created", "task.failed"], ["agent.online", "tasks.created"]),
        (["*.failed"], ["task.failed", "agent.failed"], ["task.failed.x", "failed"]),
        (["agent.online"], ["agent.online"], ["agent.online2", "agent.offline"]),
        (["*"], ["task.created", "security.x"], []),
        ([], ["anything"], []),
        (["task.created", "agent.*"], ["task.created", "agent.offline"], ["task.failed"]),
    ],
)
def test_patterns(patterns: list[str], matching: list[str], not_matching: list[str]) -> None:
    user = Principal(subject="u1", kind="user", roles=("user",))
    f = Filter.build(user, patterns, "")
    assert [t for t in matching if f(_parsed(t))] == matching
    assert [t for t in not_matching if f(_parsed(t))] == []


def test_visibility_is_the_owner_or_an_admin() -> None:
    user = Principal(subject="u1", kind="user", roles=("developer",))
    admin = Principal(subject="a", kind="user", roles=("admin",))
    theirs = _parsed("task.created", owner="u2")
    assert not Filter.build(user, [], "")(theirs)
    assert Filter.build(admin, [], "")(theirs)
    assert Filter.build(admin, [], "s")(theirs)
    assert not Filter.build(admin, [], "other")(theirs)


def _remaining(call_trailers: grpc.aio.Metadata) -> int:
    return int(dict(call_trailers)["x-ratelimit-remaining"])


async def test_a_scan_of_the_retained_events_counts_by_its_length(tmp_path: Path) -> None:
    """A list (and a replay) reads every retained event after its start that its caller may
    see: a user's own, from the bus's index of them, or for an admin everyone's (100,000 by
    default, half a second of CPU on Redis). Within a quota of calls, one caller could keep the
    server busy with nothing but full scans; each 1,000 events read count as one more call."""
    quotas = Quotas({"general": Quota(20, 3600)})
    async with _rig(tmp_path, quotas) as rig:
        await rig.publish(5_500, owner="someone-else")  # never read: another user's
        first = (await rig.publish(5_500))[0]
        await rig.publish(3, kind="task.created")
        created = events_pb2.ListEventsRequest(patterns=["task.created"])
        listed = rig.stub.ListEvents(created, metadata=rig.metadata)
        assert (await listed).total == 3
        assert _remaining(await listed.trailing_metadata()) == 19  # the call itself
        # ... and 5 more for the 5,503 events of its own it read, counted once it ended.
        listed = rig.stub.ListEvents(created, metadata=rig.metadata)
        await listed
        assert _remaining(await listed.trailing_metadata()) == 13

        # A page that starts late reads less: from there on, 2,503 events.
        later = (await rig.bus.range(EVENTS_TOPIC, first, 3_000))[-1].id
        request = events_pb2.ListEventsRequest(patterns=["task.created"], after=later)
        listed = rig.stub.ListEvents(request, metadata=rig.metadata)
        assert (await listed).total == 3
        assert _remaining(await listed.trailing_metadata()) == 7

        # 5 left after its 2 more. A stream's replay reads the same way, counted when the
        # stream ends: 1 to open it and 5 for the 5,502 events after `first`, one too many.
        stream = rig.stub.Subscribe(
            events_pb2.SubscribeRequest(patterns=["task.created"], after=first),
            metadata=rig.metadata,
        )
        seen = 0
        async for frame in stream:
            seen += frame.HasField("event")
            if seen == 3:
                break
        stream.cancel()
        await asyncio.sleep(0.2)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await rig.stub.ListEvents(request, metadata=rig.metadata)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_stream_ends_when_its_token_expires(tmp_path: Path) -> None:
    """A stream outlives the call that opened it, not the token it was opened with: the token
    is checked again every heartbeat interval, and once it has expired the stream ends with
    TOKEN_EXPIRED (the client signs in again and resumes from the last event id)."""
    async with _rig(tmp_path, heartbeat=0.5, token_lifetime=2) as rig:
        call = rig.stub.Subscribe(
            events_pb2.SubscribeRequest(patterns=["task.*"]), metadata=rig.metadata
        )
        opened = time.monotonic()
        frames = []
        async with asyncio.timeout(10):
            first = await call.read()  # a heartbeat: the subscription is live
            assert first.WhichOneof("kind") == "heartbeat", first
            (sent,) = await rig.publish(1)
            while (frame := await call.read()) is not grpc.aio.EOF:
                frames.append(frame)
        kinds = [f.WhichOneof("kind") for f in frames]
        assert [f.event.event_id for f in frames if f.HasField("event")] == [sent]
        assert kinds[-1] == "error", kinds
        assert frames[-1].error.code == "TOKEN_EXPIRED"
        # Not before the token ran out (2 s, less what the test took to get going).
        assert time.monotonic() - opened > 1
