"""Signals between agents replicas (servers/agents/signals.py): two replicas, each with its own
registry of sessions, on one database and one bus. What one is asked reaches the agent held by
the other. tests/e2e/test_replicas.py does the same with processes on Redis."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentmesh.v1 import agents_pb2
from servers.agents.domain import AgentDirectory
from servers.agents.registry import Session
from servers.agents.signals import TOPIC, Signals
from servers.common.bus import Bus, open_bus
from servers.common.context import Principal
from servers.common.follower import Follower
from servers.common.membus import MemoryBus
from servers.common.protos import struct
from tests.agents.test_directory import directory, session
from tests.tasks.test_domain import _db

ALICE = Principal(subject="alice", username="alice", roles=("user",), kind="user")


@dataclass
class Replica:
    directory: AgentDirectory
    signals: Signals
    follower: Follower

    def hold(self, one: Session, *, dispatching: bool = True) -> Session:
        one.dispatching = dispatching
        self.directory.registry.add(one)
        return one


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Replica, Replica, Bus]]:
    db = await _db(f"sqlite+aiosqlite:///{tmp_path / 'agents.db'}")
    bus = MemoryBus()
    replicas, jobs = [], []
    for _ in range(2):
        dir_ = directory(db)
        follower = Follower(bus, TOPIC, block=0.05)
        signals = Signals(
            dir_.registry, read_configuration=dir_.configuration, bus=bus, follower=follower
        )
        signals.start()
        jobs.append(asyncio.ensure_future(follower.run()))
        await follower.started.wait()
        replicas.append(Replica(dir_, signals, follower))
    yield replicas[0], replicas[1], bus
    for replica in replicas:
        await replica.signals.close()
    for job in jobs:
        job.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)
    await db.close()


async def _eventually(check: object, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "not in time"
        await asyncio.sleep(0.01)


async def _frame(one: Session, timeout: float = 2.0) -> agents_pb2.ConnectResponse:
    frame = await asyncio.wait_for(one.outbox.get(), timeout)
    assert frame is not None
    return frame


async def test_tasks_made_available_on_one_replica_wake_agents_held_by_another(
    pair: tuple[Replica, Replica, Bus],
) -> None:
    a, b, bus = pair
    able = b.hold(session("able"))
    other = b.hold(session("other"))
    other.capabilities = frozenset({"rust"})
    # Ten tasks in one turn of the loop: one entry, with their count.
    for _ in range(10):
        a.signals.tasks_available(frozenset({"python"}))
    await _eventually(able.wake.is_set)
    assert not other.wake.is_set()
    entries = await bus.range(TOPIC, "0-0", 100)
    assert [json.loads(e.fields["sets"]) for e in entries] == [[[["python"], 10]]]


async def test_a_cancellation_reaches_the_replica_that_holds_the_task(
    pair: tuple[Replica, Replica, Bus],
) -> None:
    a, b, bus = pair
    agent = b.hold(session())
    agent.held.update({"t1": "attempt-1", "t2": "attempt-1"})
    # The stopper's words cross too, cut to their bound.
    await a.signals.cancel(agent.agent_id, "t1", "STOPPED", "attempt-1", "budget " + "x" * 600)
    sent = (await _frame(agent)).cancellation
    assert (sent.task_id, sent.reason, sent.attempt_token) == ("t1", "STOPPED", "attempt-1")
    assert sent.message == ("budget " + "x" * 600)[:500]
    assert agent.held == {"t2": "attempt-1"}

    # A replica that holds the task itself tells nobody else.
    here = a.hold(session("here"))
    here.held["t3"] = "attempt-1"
    before = len(await bus.range(TOPIC, "0-0", 100))
    await a.signals.cancel(here.agent_id, "t3", "STOPPED", "attempt-1")
    assert (await _frame(here)).cancellation.reason == "STOPPED"
    assert len(await bus.range(TOPIC, "0-0", 100)) == before


async def test_a_configuration_change_reaches_the_agent_on_another_replica(
    pair: tuple[Replica, Replica, Bus],
) -> None:
    a, b, _ = pair
    agent = session()
    await b.directory.connect(agent, {"model": "small", "temperature": 0.7})
    agent.dispatching = True
    change = await a.directory.configure(ALICE, agent.agent_id, {"temperature": 0.2}, [])
    assert change.session is None  # not connected to a
    await a.signals.configured(
        agent.agent_id, change.session, change.configuration, change.updated_fields
    )
    update = (await _frame(agent)).config_update
    assert update.configuration == struct({"model": "small", "temperature": 0.2})
    assert list(update.updated_fields) == ["temperature"]
    assert agent.configuration == {"model": "small", "temperature": 0.2}


async def test_a_connect_agent_connecting_again_elsewhere_ends_its_older_stream(
    pair: tuple[Replica, Replica, Bus],
) -> None:
    a, b, _ = pair
    old = b.hold(session())
    http_agent = b.hold(session("http"))
    http_agent.http = True
    await a.signals.connected(session())  # the same agent, a new session, on a
    frame = await _frame(old)
    assert frame.WhichOneof("kind") == "end" and frame.end.reason == "REPLACED"
    # An HTTP agent's calls go to any replica: a session of it elsewhere ends nothing.
    again = session("http")
    again.http = True
    await a.signals.connected(again)
    # A session of it that began after the one a signal tells of (the agent came back here
    # while the signal was on its way) is not the older one, and stays.
    late = b.hold(session())
    await a.signals.connected(old)
    await asyncio.sleep(0.2)
    assert http_agent.outbox.empty() and late.outbox.empty()


async def test_malformed_signals_are_ignored(
    pair: tuple[Replica, Replica, Bus], caplog: pytest.LogCaptureFixture
) -> None:
    a, b, bus = pair
    agent = b.hold(session())
    agent.held["t1"] = "x"
    ids: list[str] = []
    for fields in (
        {"kind": "wake", "sets": "not json"},
        {"kind": "wake", "sets": json.dumps([[[1, 2], 3]])},
        {"kind": "cancel", "agent_id": agent.agent_id},
        {"kind": "config", "agent_id": agent.agent_id, "fields": '{"a": 1}'},
        # A kind this version does not know (a newer replica's, in a rolling upgrade).
        {"kind": "launch", "agent_id": agent.agent_id},
    ):
        ids.append(await bus.publish(TOPIC, fields, retention_ms=60_000, max_len=100))
    # The next good one still arrives.
    await a.signals.cancel(agent.agent_id, "t1", "CANCELLED", "x")
    assert (await _frame(agent)).cancellation.task_id == "t1"
    assert agent.outbox.empty()
    logged = {
        r.getMessage().split()[6].rstrip(":")
        for r in caplog.records
        if r.getMessage().startswith("ignored a malformed agents signals entry")
    }
    assert logged == set(ids[:4])


async def test_without_a_bus_everything_stays_in_the_process(tmp_path: Path) -> None:
    db = await _db(f"sqlite+aiosqlite:///{tmp_path / 'agents.db'}")
    try:
        dir_ = directory(db)
        signals = Signals(dir_.registry, read_configuration=dir_.configuration)
        signals.start()
        one = session()
        one.dispatching = True
        dir_.registry.add(one)
        signals.tasks_available(frozenset({"echo"}))
        assert one.wake.is_set()
        await signals.cancel(one.agent_id, "t", "CANCELLED", "")
        assert (await _frame(one)).cancellation.task_id == "t"
        await signals.connected(session())
        await signals.close()
    finally:
        await db.close()


async def test_a_bus_outage_is_logged_once_not_per_signal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down (nobody listens on port 1): every publish fails, one warning says so; once
    publishing works again, one line says that."""
    db = await _db(f"sqlite+aiosqlite:///{tmp_path / 'agents.db'}")
    down = open_bus("redis://127.0.0.1:1/0", prefix="signals-test:")
    try:
        dir_ = directory(db)
        signals = Signals(dir_.registry, read_configuration=dir_.configuration, bus=down)
        caplog.set_level(logging.INFO, logger="agentmesh.agents")
        for n in range(5):
            await signals.cancel("elsewhere", f"t{n}", "CANCELLED", "")
        assert caplog.text.count("could not publish agents signals") == 1
        assert signals._broadcast is not None
        signals._broadcast.bus = MemoryBus()  # Redis is back
        await signals.cancel("elsewhere", "t", "CANCELLED", "")
        await signals.cancel("elsewhere", "t", "CANCELLED", "")
        assert caplog.text.count("agents signals are published again") == 1
        await signals.close()
    finally:
        await down.close()
        await db.close()
