"""Invalidations between auth replicas (servers/auth/invalidations.py): two replicas' caches on
one bus. What one forgets after its own write, the other forgets too. tests/e2e/test_replicas.py
does the same with processes on Redis, through revocation and `agentmesh grant-role`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

import pytest

from servers.auth import invalidations
from servers.auth.invalidations import TOPIC, Invalidations
from servers.auth.profiles import AccountCache
from servers.common.bus import Bus
from servers.common.follower import Follower
from servers.common.membus import MemoryBus
from tests.auth.test_profiles import _remember, _user

Pair = tuple[AccountCache, AccountCache, Bus]


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    bus = MemoryBus()
    caches, sides, jobs = [], [], []
    for _ in range(2):
        cache = AccountCache(ttl=300)
        follower = Follower(bus, TOPIC, block=0.05)
        side = Invalidations(cache, bus=bus, follower=follower)
        side.start()
        jobs.append(asyncio.ensure_future(follower.run()))
        await follower.started.wait()
        caches.append(cache)
        sides.append(side)
    yield caches[0], caches[1], bus
    for side in sides:
        await side.close()
    for job in jobs:
        job.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)


async def _eventually(check: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not in time"
        await asyncio.sleep(0.01)


async def _entries(bus: Bus) -> list[dict[str, str]]:
    return [dict(e.fields) for e in await bus.read(TOPIC, "0-0", count=100, block=0)]


async def test_a_revocation_on_one_replica_forgets_the_account_on_the_other(pair: Pair) -> None:
    a, b, bus = pair
    alice, bob = _user("alice"), _user("bob")
    for cache in (a, b):
        _remember(cache, "alice-1", alice)
        _remember(cache, "alice-2", alice)
        _remember(cache, "bob-1", bob)
        cache.put_profile(alice, cache.epoch)
    a.forget_key("alice-1", "alice")
    assert a.key("alice-1") is None and a.key("alice-2") is not None  # here: that key only
    await _eventually(lambda: b.key("alice-1") is None)
    # There: the whole account, read again at its next request; others are left alone.
    assert b.key("alice-2") is None and b.profile("alice") is None
    assert b.key("bob-1") is not None
    [entry] = await _entries(bus)
    assert json.loads(entry["users"]) == ["alice"]  # no key hash leaves the process


async def test_a_forget_is_applied_where_it_arrives_without_being_announced_again(
    pair: Pair,
) -> None:
    a, b, bus = pair
    _remember(b, "k", _user("carol"))
    before = b.epoch  # a read that began on b before the forget arrived...
    a.forget_user("carol")
    await _eventually(lambda: b.key("k") is None)
    _remember(b, "k", _user("carol"), epoch=before)  # ...does not put the old row back
    assert b.key("k") is None
    await asyncio.sleep(0.1)
    assert len(await _entries(bus)) == 1


async def test_forgets_of_one_turn_go_out_as_one_entry(pair: Pair) -> None:
    a, b, bus = pair
    names = [f"user-{n}" for n in range(invalidations.IDS_PER_ENTRY + 5)]
    for name in names:
        _remember(b, name, _user(name))
    for name in names:
        a.forget_user(name)
    a.forget_user(names[0])  # once is enough
    await _eventually(lambda: all(b.key(name) is None for name in names))
    sent = [json.loads(e["users"]) for e in await _entries(bus)]
    assert [len(ids) for ids in sent] == [invalidations.IDS_PER_ENTRY, 5]
    assert [i for ids in sent for i in ids] == names


async def test_malformed_entries_are_ignored(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    a, b, bus = pair
    _remember(b, "k", _user("dave"))
    ids = []
    for fields in (
        {"kind": "forget", "users": "not json"},
        {"kind": "forget", "users": json.dumps([1, 2])},
        {"kind": "forget", "users": json.dumps(["x" * 65])},
        {"kind": "forget"},
        {"kind": "rotate", "users": "[]"},  # a newer replica's kind: skipped quietly
    ):
        ids.append(await bus.publish(TOPIC, fields, retention_ms=60_000, max_len=100))
    a.forget_user("dave")  # the next good one still arrives
    await _eventually(lambda: b.key("k") is None)
    malformed = {  # each replica logs each once
        r.getMessage().split()[6].rstrip(":")
        for r in caplog.records
        if r.getMessage().startswith("ignored a malformed auth invalidations entry")
    }
    assert malformed == set(ids[:4])


async def test_waiting_forgets_are_bounded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The bus is slow to answer: the forgets that come meanwhile queue up to PENDING_MAX, and
    one warning says the rest are left to expire."""
    monkeypatch.setattr(invalidations, "PENDING_MAX", 3)
    cache = AccountCache()
    bus = MemoryBus()
    side = Invalidations(cache, bus=bus, follower=Follower(bus, TOPIC))
    side.start()
    caplog.set_level(logging.WARNING, logger="agentmesh.auth")
    for n in range(6):
        cache.forget_user(f"u{n}")
    await side.close()
    sent = [json.loads(e["users"]) for e in await _entries(bus)]
    assert sent == [["u0", "u1", "u2"]]
    assert caplog.text.count("left to expire") == 1
