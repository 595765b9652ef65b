"""The bus: one suite for both implementations, then how RedisBus behaves when Redis fails."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest
import redis.asyncio as redis

from servers.common.bus import Bus, BusUnavailable, Entry, open_bus, parse_id
from servers.common.membus import MemoryBus
from servers.common.redisbus import RedisBus
from tests.conftest import RedisServer, _unavailable, restart_redis

REDIS_URL = os.environ.get("AGENTMESH_TEST_REDIS", "redis://127.0.0.1:6379/0")
KEEP: dict[str, Any] = {"retention_ms": 3_600_000, "max_len": 100_000}  # nothing is trimmed


@pytest.fixture(params=["memory", "redis"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    """Each bus, empty: the machine's Redis under a prefix of this test's own."""
    if request.param == "memory":
        memory = MemoryBus()
        yield memory
        await memory.close()
        return
    prefix = f"agentmesh-test:{uuid.uuid4().hex}:"
    client = redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
    try:
        await client.ping()
    except (redis.RedisError, OSError) as exc:
        await client.aclose()
        _unavailable(f"Redis at {REDIS_URL}", exc)
    bus = RedisBus(REDIS_URL, prefix=prefix)
    try:
        yield bus
    finally:
        await bus.close()
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def publish(bus: Bus, topic: str, n: int, **trim: Any) -> list[str]:
    return [await bus.publish(topic, {"n": str(i)}, **(trim or KEEP)) for i in range(n)]


def ids(entries: list[Entry]) -> list[str]:
    return [e.id for e in entries]


async def everything(bus: Bus, topic: str) -> list[Entry]:
    return await bus.range(topic, "0-0", 1_000_000)


async def test_ids_increase_and_fields_round_trip(bus: Bus) -> None:
    fields = {"type": "task.created", "data": '{"a": [1, "é"]}', "empty": ""}
    first = await bus.publish("t", fields, **KEEP)
    rest = await publish(bus, "t", 50)
    keys = [parse_id(i) for i in [first, *rest]]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert (await everything(bus, "t"))[0] == Entry(first, fields)


async def test_range_is_exclusive_and_ordered(bus: Bus) -> None:
    sent = await publish(bus, "t", 5)
    assert ids(await bus.range("t", sent[1], 10)) == sent[2:]
    assert ids(await bus.range("t", "0-0", 2)) == sent[:2]
    assert await bus.range("t", sent[-1], 10) == []
    assert [e.fields for e in await bus.range("t", "0-0", 10)] == [{"n": str(i)} for i in range(5)]
    assert await bus.range("nothing-here", "0-0", 10) == []
    with pytest.raises(ValueError):
        await bus.range("t", "not-an-id", 10)


async def test_read_returns_what_is_there_at_once(bus: Bus) -> None:
    sent = await publish(bus, "t", 5)
    started = time.monotonic()
    assert ids(await bus.read("t", sent[0], count=3, block=5)) == sent[1:4]
    assert time.monotonic() - started < 1


async def test_read_waits_for_a_publish(bus: Bus) -> None:
    after = await bus.last_id("t")
    reader = asyncio.create_task(bus.read("t", after, count=10, block=10))
    await asyncio.sleep(0.3)
    assert not reader.done()
    sent = await bus.publish("t", {"k": "v"}, **KEEP)
    published = time.monotonic()
    got = await asyncio.wait_for(reader, 2)
    assert time.monotonic() - published < 0.5
    assert got == [Entry(sent, {"k": "v"})]


async def test_read_times_out_empty(bus: Bus) -> None:
    last = (await publish(bus, "t", 1))[0]
    started = time.monotonic()
    assert await bus.read("t", last, count=10, block=0.3) == []
    assert 0.25 <= time.monotonic() - started < 1.5
    # block 0 must not wait (in Redis, BLOCK 0 would wait forever)
    started = time.monotonic()
    assert await bus.read("t", last, count=10, block=0) == []
    assert await bus.read("nothing-here", "0-0", count=10, block=0) == []
    assert time.monotonic() - started < 0.5


async def test_first_and_last_id(bus: Bus) -> None:
    assert await bus.first_id("t") == "0-0"
    assert await bus.last_id("t") == "0-0"
    sent = await publish(bus, "t", 3)
    assert await bus.first_id("t") == sent[0]
    assert await bus.last_id("t") == sent[-1]


async def test_trim_by_max_len(bus: Bus) -> None:
    # Redis trims whole nodes of ~100 entries ("~"), so publish well past one node.
    sent = await publish(bus, "t", 350, retention_ms=3_600_000, max_len=10)
    kept = ids(await everything(bus, "t"))
    assert 10 <= len(kept) < 350
    assert kept == sent[-len(kept) :]  # the newest, none missing
    assert await bus.first_id("t") == kept[0] != sent[0]
    assert await bus.last_id("t") == sent[-1]


async def test_trim_by_retention(bus: Bus) -> None:
    old = await publish(bus, "t", 350)
    await asyncio.sleep(0.5)
    new = await publish(bus, "t", 5, retention_ms=300, max_len=100_000)
    kept = ids(await everything(bus, "t"))
    assert kept[-5:] == new  # within retention: never trimmed
    assert len(kept) < 355 and kept == (old + new)[-len(kept) :]
    assert await bus.first_id("t") == kept[0] != old[0]


async def test_an_index_holds_its_entries_under_the_same_ids(bus: Bus) -> None:
    a = await bus.publish("t", {"o": "a"}, index="t.a", **KEEP)
    b = await bus.publish("t", {"o": "b"}, index="t.b", **KEEP)
    a2 = await bus.publish("t", {"o": "a"}, index="t.a", **KEEP)
    plain = await bus.publish("t", {"o": "-"}, **KEEP)
    assert ids(await everything(bus, "t")) == [a, b, a2, plain]
    indexed = await everything(bus, "t.a")
    assert ids(indexed) == [a, a2] and indexed[0].fields == {"o": "a"}
    # A position in the topic is one in the index: a reader resumes from either.
    assert ids(await bus.range("t.a", b, 10)) == [a2]
    assert await bus.range("t.nobody", "0-0", 10) == []


async def test_an_index_keeps_nothing_its_topic_trimmed(bus: Bus) -> None:
    # Every other entry indexed; the topic keeps about its newest 10 (Redis trims whole nodes
    # of ~100 entries), and the index nothing older than the topic's first.
    sent = [
        await bus.publish(
            "t", {"n": str(n)}, index="t.odd" if n % 2 else "", retention_ms=3_600_000, max_len=10
        )
        for n in range(350)
    ]
    kept = ids(await everything(bus, "t"))
    indexed = ids(await everything(bus, "t.odd"))
    assert 0 < len(indexed) < 175 and indexed == sent[1::2][-len(indexed) :]
    # Redis trims by whole nodes of ~100 entries ("~"): up to a node may stay behind.
    older = [i for i in indexed if parse_id(i) < parse_id(kept[0])]
    assert len(older) <= (0 if isinstance(bus, MemoryBus) else 100)


async def test_an_idle_index_is_dropped_after_its_retention(bus: Bus) -> None:
    await bus.publish("t", {"n": "0"}, index="t.idle", retention_ms=300, max_len=1000)
    assert len(await everything(bus, "t.idle")) == 1
    # The in-process bus drops idle indexes when it next adds to one, once a second at most.
    await asyncio.sleep(1.2)
    await bus.publish("t", {"n": "1"}, index="t.busy", retention_ms=300, max_len=1000)
    assert await everything(bus, "t.idle") == []
    assert len(await everything(bus, "t.busy")) == 1


async def test_topics_are_independent(bus: Bus) -> None:
    a = await publish(bus, "a", 3)
    b = await publish(bus, "b", 2)
    assert ids(await everything(bus, "a")) == a
    assert ids(await everything(bus, "b")) == b
    assert (await bus.first_id("b"), await bus.last_id("b")) == (b[0], b[-1])
    await bus.publish("a", {"n": "x"}, retention_ms=3_600_000, max_len=1)
    assert ids(await everything(bus, "b")) == b
    await bus.ensure_group("a", "g")
    await bus.ensure_group("b", "g")
    more_b = await publish(bus, "b", 1)
    assert await bus.read_group("a", "g", "c", count=10, block=0) == []
    assert ids(await bus.read_group("b", "g", "c", count=10, block=0)) == more_b


async def test_every_follower_sees_every_entry(bus: Bus) -> None:
    async def follow(after: str) -> list[str]:
        seen: list[str] = []
        while len(seen) < 6:
            got = await bus.read("t", after, count=4, block=5)
            seen += ids(got)
            after = seen[-1] if seen else after
        return seen

    start = await bus.last_id("t")
    followers = [asyncio.create_task(follow(start)) for _ in range(2)]
    await asyncio.sleep(0.2)
    sent = await publish(bus, "t", 3)
    await asyncio.sleep(0.1)
    sent += await publish(bus, "t", 3)
    assert await asyncio.wait_for(asyncio.gather(*followers), 5) == [sent, sent]


async def test_group_gives_each_entry_to_one_consumer(bus: Bus) -> None:
    await bus.ensure_group("t", "g")
    sent = await publish(bus, "t", 20)
    one = await bus.read_group("t", "g", "c1", count=7, block=0)
    two = await bus.read_group("t", "g", "c2", count=100, block=0)
    assert len(one) == 7 and ids(one + two) == sent
    # Pending entries are not delivered again, to anyone.
    assert await bus.read_group("t", "g", "c1", count=100, block=0) == []
    assert await bus.read_group("t", "g", "c2", count=100, block=0) == []


async def test_group_read_waits_for_a_publish(bus: Bus) -> None:
    await bus.ensure_group("t", "g")
    readers = [
        asyncio.create_task(bus.read_group("t", "g", c, count=10, block=10)) for c in ("c1", "c2")
    ]
    await asyncio.sleep(0.3)
    sent = await bus.publish("t", {"k": "v"}, **KEEP)
    published = time.monotonic()
    done, _ = await asyncio.wait(readers, timeout=2, return_when=asyncio.FIRST_COMPLETED)
    assert time.monotonic() - published < 0.5
    got = [ids(task.result()) for task in done]
    assert [sent] in got
    assert got == [[sent]], "the consumer without the entry stopped waiting before its time"
    await asyncio.sleep(0.2)
    assert sum(task.done() for task in readers) == 1
    started = time.monotonic()
    assert await bus.read_group("t", "g", "c3", count=10, block=0.3) == []
    assert 0.25 <= time.monotonic() - started < 1.5
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)


async def test_stale_entries_are_claimed_after_min_idle(bus: Bus) -> None:
    await bus.ensure_group("t", "g")
    sent = await publish(bus, "t", 4)
    assert ids(await bus.read_group("t", "g", "dead", count=10, block=0)) == sent
    await bus.ack("t", "g", [sent[1]])
    assert await bus.claim_stale("t", "g", "heir", min_idle=0.5, count=10) == []
    await asyncio.sleep(0.6)
    claimed = await bus.claim_stale("t", "g", "heir", min_idle=0.5, count=2)
    assert ids(claimed) == [sent[0], sent[2]] and claimed[0].fields == {"n": "0"}
    rest = await bus.claim_stale("t", "g", "heir", min_idle=0.5, count=10)
    assert ids(rest) == [sent[3]]
    # Claiming makes them pending with the heir, idle from now.
    assert await bus.claim_stale("t", "g", "other", min_idle=0.5, count=10) == []
    await bus.ack("t", "g", [sent[0], sent[2]])
    await bus.ack("t", "g", [])
    await asyncio.sleep(0.6)
    assert ids(await bus.claim_stale("t", "g", "other", min_idle=0.5, count=10)) == [sent[3]]
    await bus.ack("t", "g", [sent[3]])
    assert await bus.claim_stale("t", "g", "other", min_idle=0, count=10) == []


async def test_claim_skips_entries_trimmed_while_pending(bus: Bus) -> None:
    await bus.ensure_group("t", "g")
    sent = await publish(bus, "t", 350)
    assert len(await bus.read_group("t", "g", "dead", count=1000, block=0)) == 350
    await bus.publish("t", {"n": "last"}, retention_ms=3_600_000, max_len=10)
    kept = [i for i in ids(await everything(bus, "t")) if i in sent]
    assert len(kept) < 350
    claimed = await bus.claim_stale("t", "g", "heir", min_idle=0, count=1000)
    assert ids(claimed) == kept


async def test_ensure_group_is_idempotent_and_starts_at_the_end(bus: Bus) -> None:
    await bus.ensure_group("new", "g")  # on a topic that does not exist yet
    await publish(bus, "t", 3)
    await bus.ensure_group("t", "g")
    await bus.ensure_group("t", "g")
    later = await publish(bus, "t", 2)
    assert ids(await bus.read_group("t", "g", "c", count=10, block=0)) == later
    again = await publish(bus, "t", 1)
    await bus.ensure_group("t", "g")  # neither moves the group to the end nor back
    assert ids(await bus.read_group("t", "g", "c", count=10, block=0)) == again
    fresh = await publish(bus, "new", 1)
    assert ids(await bus.read_group("new", "g", "c", count=10, block=0)) == fresh


async def test_close_wakes_blocked_readers(bus: Bus) -> None:
    assert await bus.ping() is True
    await bus.ensure_group("t", "g")
    reader = asyncio.create_task(bus.read("t", "0-0", count=10, block=30))
    member = asyncio.create_task(bus.read_group("t", "g", "c", count=10, block=30))
    await asyncio.sleep(0.3)
    await bus.close()
    assert await asyncio.wait_for(asyncio.gather(reader, member), 2) == [[], []]
    assert await bus.ping() is False
    await bus.close()


async def test_open_bus_picks_the_implementation() -> None:
    memory = open_bus(None)
    on_redis = open_bus(REDIS_URL, prefix="agentmesh-test:")
    assert isinstance(memory, MemoryBus) and isinstance(on_redis, RedisBus)
    await memory.close()
    await on_redis.close()


# RedisBus when Redis fails: a server of the test's own that the test stops and starts again.


@pytest.fixture
async def own(redis_server: RedisServer) -> AsyncIterator[tuple[RedisBus, RedisServer]]:
    bus = RedisBus(redis_server[0], prefix="agentmesh-test:")
    yield bus, redis_server
    await bus.close()


async def restart(server: RedisServer) -> subprocess.Popen[bytes]:
    return await asyncio.to_thread(restart_redis, server)


async def fails_fast(call: Awaitable[object]) -> None:
    started = time.monotonic()
    with pytest.raises(BusUnavailable) as caught:
        await call
    assert time.monotonic() - started < 2
    assert caught.value.__cause__ is not None


async def test_redis_down_fails_fast_and_recovers(own: tuple[RedisBus, RedisServer]) -> None:
    bus, (_, proc) = own
    await bus.ensure_group("t", "g")
    before = await bus.publish("t", {"n": "0"}, **KEEP)
    blocked = asyncio.create_task(bus.read("t", before, count=10, block=30))
    await asyncio.sleep(0.3)
    proc.kill()
    proc.wait()
    with pytest.raises(BusUnavailable):  # the blocked read, woken by the lost connection
        await asyncio.wait_for(blocked, 2)
    await fails_fast(bus.publish("t", {"n": "1"}, **KEEP))
    await fails_fast(bus.range("t", "0-0", 10))
    await fails_fast(bus.read("t", "0-0", count=10, block=0))
    await fails_fast(bus.read("t", "0-0", count=10, block=5))
    await fails_fast(bus.read_group("t", "g", "c", count=10, block=0))
    await fails_fast(bus.read_group("t", "g", "c", count=10, block=5))
    await fails_fast(bus.claim_stale("t", "g", "c", min_idle=0, count=10))
    await fails_fast(bus.ack("t", "g", [before]))
    await fails_fast(bus.last_id("t"))
    await fails_fast(bus.first_id("t"))
    await fails_fast(bus.ensure_group("t", "g2"))
    started = time.monotonic()
    assert await bus.ping() is False
    assert time.monotonic() - started < 2

    again = await restart(own[1])
    try:
        assert await bus.ping() is True
        # The server lost its data: the topic starts over, and the group comes back by itself.
        sent = await bus.publish("t", {"n": "2"}, **KEEP)
        assert ids(await bus.range("t", "0-0", 10)) == [sent]
        assert ids(await bus.read("t", "0-0", count=10, block=1)) == [sent]
        assert ids(await bus.read_group("t", "g", "c", count=10, block=1)) == [sent]
        waiting = asyncio.create_task(bus.read_group("t", "g", "c", count=10, block=5))
        await asyncio.sleep(0.2)
        newer = await bus.publish("t", {"n": "3"}, **KEEP)
        assert ids(await asyncio.wait_for(waiting, 2)) == [newer]
    finally:
        again.kill()
        again.wait()


async def test_redis_restart_while_idle_goes_unnoticed(own: tuple[RedisBus, RedisServer]) -> None:
    bus, (_, proc) = own
    await bus.publish("t", {"n": "0"}, **KEEP)
    await bus.read("t", "0-0", count=10, block=0.1)  # a connection in each pool
    proc.kill()
    proc.wait()
    again = await restart(own[1])
    try:
        # The pooled connections died with the old server; the first calls reconnect.
        sent = await bus.publish("t", {"n": "1"}, **KEEP)
        assert ids(await bus.read("t", "0-0", count=10, block=1)) == [sent]
    finally:
        again.kill()
        again.wait()


async def test_redis_hung_fails_fast_and_recovers(own: tuple[RedisBus, RedisServer]) -> None:
    bus, (_, proc) = own
    await bus.publish("t", {"n": "0"}, **KEEP)
    proc.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        await fails_fast(bus.publish("t", {"n": "1"}, **KEEP))
        await fails_fast(bus.range("t", "0-0", 10))
        await fails_fast(bus.read("t", "0-0", count=10, block=0.5))
        started = time.monotonic()
        assert await bus.ping() is False
        assert time.monotonic() - started < 2
    finally:
        proc.send_signal(signal.SIGCONT)
    assert await bus.ping() is True
    sent = await bus.publish("t", {"n": "2"}, **KEEP)
    assert (await bus.range("t", "0-0", 10))[-1].id == sent


async def test_a_cancellation_that_looks_like_a_timeout_still_cancels() -> None:
    """Python 3.11's asyncio.timeout turns a cancellation that lands as its own timeout expires
    into TimeoutError (and redis-py may turn one into a connection error). Taken for a bus
    outage, the caller's loop (a callback worker) swallowed it and ran on after close."""
    bus = RedisBus("redis://127.0.0.1:6379/0", prefix=f"test-{uuid.uuid4().hex}:")
    caller: list[asyncio.Task[Any]] = []

    async def cut_as_it_times_out(*args: Any, **kwargs: Any) -> Any:
        caller[0].cancel()  # the caller's cancellation arrives ...
        raise TimeoutError  # ... and what the command raises is a timeout

    try:
        for run in (
            lambda: bus._block(1.0, cut_as_it_times_out),
            lambda: bus._run(cut_as_it_times_out),
        ):
            caller[:] = [asyncio.create_task(run())]
            with pytest.raises(asyncio.CancelledError):
                await caller[0]
    finally:
        await bus.close()


async def test_a_cancelled_caller_does_not_wait_for_a_hanging_command() -> None:
    """redis-py cleans up after a cancelled command (its connection goes back to the pool,
    under the pool's lock) before the cancellation reaches the caller; that was seen to hang
    past 10 s and keep a callback worker from stopping. The caller now stops at once."""
    bus = RedisBus("redis://127.0.0.1:6379/0", prefix=f"test-{uuid.uuid4().hex}:")

    async def slow_to_clean_up(*args: Any, **kwargs: Any) -> Any:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(1.5)  # the clean-up outlasts the cancellation

    try:
        for run in (
            lambda: bus._block(30.0, slow_to_clean_up),
            lambda: bus._run(slow_to_clean_up),
        ):
            task = asyncio.create_task(run())
            await asyncio.sleep(0.05)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=0.5)
            assert task in done and task.cancelled()
        await asyncio.sleep(1.6)  # the commands' own clean-up ends too
    finally:
        await bus.close()
