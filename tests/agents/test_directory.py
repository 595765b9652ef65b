"""The agent registry table on each database: connect and disconnect, overrides that outlive
the server, liveness (touch and reap), lookups, and the events each change writes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from servers.agents import domain
from servers.agents.domain import AgentDirectory
from servers.agents.models import AgentRow, OutboxRow
from servers.agents.registry import Registry, Session
from servers.agents.service import agent_id_of
from servers.common.clock import now
from servers.common.context import Principal
from servers.common.db import Database
from servers.common.errors import NotFound, RateLimited, ValidationError
from servers.common.pagination import Page
from servers.common.protos import NESTING_MAX
from tests.tasks.test_domain import _db

ALICE = Principal(subject="alice", kind="user", roles=("developer",))
BOB = Principal(subject="bob", kind="user", roles=("developer",))
ADMIN = Principal(subject="root", kind="user", roles=("admin",))


def session(name: str = "worker", *, owner: str = "alice", capacity: int = 2) -> Session:
    return Session(
        agent_id=agent_id_of(owner, name),
        owner_id=owner,
        key_id=f"key-of-{owner}",
        name=name,
        type="specialist",
        capabilities=frozenset({"echo", "python"}),
        capacity=capacity,
        configuration={},
        version="1.0",
    )


def directory(db: Database, heartbeat: float = 10) -> AgentDirectory:
    """A fresh agents server's view: its own (empty) registry of live sessions."""
    return AgentDirectory(db=db, registry=Registry(), heartbeat_seconds=heartbeat)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await _db(database_url)
    yield database
    await database.close()


async def events(db: Database, agent_id: str) -> list[tuple[str, dict[str, Any]]]:
    async with db.session() as s:
        rows = await s.execute(
            select(OutboxRow.event_type, OutboxRow.data, OutboxRow.owner_id)
            .where(OutboxRow.subject_id == agent_id)
            .order_by(OutboxRow.id)
        )
    out = []
    for event_type, data, owner in rows.all():
        assert data["agent_id"] == agent_id and owner == "alice"
        out.append((event_type, data))
    return out


async def row(db: Database, agent_id: str) -> AgentRow:
    async with db.session() as s:
        found = await s.get(AgentRow, agent_id)
    assert found is not None
    return found


async def test_a_disconnected_agent_is_listed_offline(db: Database) -> None:
    agents = directory(db)
    live = session()
    await agents.connect(live, {"model": "small"})
    listed = await agents.listing(ALICE, "", [])
    assert [(v.name, v.status) for v in listed.agents] == [("worker", "idle")]
    assert (listed.online, listed.idle) == (1, 1)

    agents.registry.remove(live)
    await agents.disconnect(live, "AGENT_STOPPED")
    one = await agents.get(ALICE, live.agent_id)
    assert one.status == "offline" and not one.online
    assert one.connected_at is None and one.last_seen_at is not None
    assert one.configuration == {"model": "small"} and one.capabilities == ("echo", "python")
    assert [v.agent_id for v in (await agents.listing(ALICE, "offline", [])).agents] == [
        live.agent_id
    ]
    # A page's agents come with their stored configuration (read for the page only).
    paged = await agents.listing(ALICE, "", [], Page(limit=1, offset=0))
    assert [v.configuration for v in paged.agents] == [{"model": "small"}] and paged.total == 1
    assert (await agents.listing(ALICE, "", [], Page(limit=1, offset=1))).agents == []
    assert (await agents.listing(ALICE, "idle", [])).agents == []
    offline = await agents.listing(ALICE, "", ["python"])
    assert (len(offline.agents), offline.online, offline.idle) == (1, 0, 0)
    assert (await agents.listing(ALICE, "", ["rust"])).agents == []

    kinds = await events(db, live.agent_id)
    assert [k for k, _ in kinds] == ["agent.online", "agent.offline"]
    online, gone = kinds[0][1], kinds[1][1]
    assert online["name"] == "worker" and online["status"] == "idle"
    assert online["capabilities"] == ["echo", "python"]
    assert gone["status"] == "offline" and gone["reason"] == "AGENT_STOPPED"
    assert gone["last_seen_at"]
    # Disconnecting again writes nothing more.
    await agents.disconnect(live, "AGENT_STOPPED")
    assert len(await events(db, live.agent_id)) == 2


async def test_only_the_owner_or_an_admin_sees_an_agent(db: Database) -> None:
    agents = directory(db)
    live = session()
    await agents.connect(live, {})
    assert (await agents.listing(BOB, "", [])).agents == []
    with pytest.raises(NotFound):
        await agents.get(BOB, live.agent_id)
    with pytest.raises(NotFound):
        await agents.configure(BOB, live.agent_id, {"x": 1}, [])
    with pytest.raises(NotFound):
        await agents.get(ALICE, "no-such-agent")
    assert (await agents.get(ADMIN, live.agent_id)).name == "worker"
    assert len((await agents.listing(ADMIN, "", [])).agents) == 1
    with pytest.raises(ValidationError):
        await agents.listing(ALICE, "asleep", [])


async def test_overrides_outlive_the_connection_and_the_server(db: Database) -> None:
    agents = directory(db)
    first = session()
    await agents.connect(first, {"model": "small", "temperature": 0.7, "style": "terse"})
    change = await agents.configure(ALICE, first.agent_id, {"temperature": 0.9}, [])
    assert change.session is first and change.updated_fields == ["temperature"]
    assert first.configuration == {"model": "small", "temperature": 0.9, "style": "terse"}
    agents.registry.remove(first)
    await agents.disconnect(first, "DISCONNECTED")

    # Offline, the configuration can still be changed; a masked key absent from the body goes.
    change = await agents.configure(ALICE, first.agent_id, {}, ["style"])
    assert change.session is None
    assert change.configuration == {"model": "small", "temperature": 0.9}

    # Another server (a restart): the agent says Hello with its defaults; the overrides win.
    restarted = directory(db)
    again = session()
    await restarted.connect(again, {"model": "large", "temperature": 0.1, "style": "long"})
    assert again.configuration == {"model": "large", "temperature": 0.9}
    assert (await restarted.get(ALICE, again.agent_id)).configuration == again.configuration
    # "*" replaces the whole configuration.
    change = await restarted.configure(ALICE, again.agent_id, {"only": True}, ["*"])
    assert change.configuration == {"only": True} and again.configuration == {"only": True}
    with pytest.raises(ValidationError):
        await restarted.configure(ALICE, again.agent_id, {"a": {"b": 1}}, ["a.b"])
    with pytest.raises(ValidationError):
        await restarted.configure(ALICE, again.agent_id, {"big": "x" * 70_000}, [])
    deep: dict[str, object] = {}
    for _ in range(NESTING_MAX):
        deep = {"a": deep}
    with pytest.raises(ValidationError) as too_deep:
        await restarted.configure(ALICE, again.agent_id, {"deep": deep}, [])
    assert "deeper than 20 levels" in too_deep.value.message

    updates = [d for k, d in await events(db, first.agent_id) if k == "agent.config_updated"]
    assert [d["updated_fields"] for d in updates] == [
        ["temperature"],
        ["style"],
        ["model", "only", "temperature"],
    ]
    assert [d["status"] for d in updates] == ["idle", "offline", "idle"]


async def test_a_replaced_stream_does_not_take_its_successor_offline(db: Database) -> None:
    agents = directory(db)
    old, new = session(), session()
    assert await agents.connect(old, {}) is None
    assert await agents.connect(new, {}) is old
    await agents.disconnect(old, "REPLACED")
    assert (await row(db, new.agent_id)).online
    assert (await agents.get(ALICE, new.agent_id)).online
    agents.registry.remove(new)
    await agents.disconnect(new, "DISCONNECTED")
    assert not (await row(db, new.agent_id)).online
    assert [k for k, _ in await events(db, new.agent_id)] == [
        "agent.online",
        "agent.online",
        "agent.offline",
    ]


async def test_the_same_agent_connecting_on_two_servers_at_once(db: Database) -> None:
    one, two = directory(db), directory(db)
    a, b = session(), session()
    await asyncio.gather(one.connect(a, {}), two.connect(b, {}))
    async with db.session() as s:
        rows = (await s.execute(select(AgentRow))).scalars().all()
    assert len(rows) == 1 and rows[0].online
    assert rows[0].session_id in (a.session_id, b.session_id)


async def test_touch_keeps_a_connected_agent_online_and_reap_takes_the_rest_offline(
    db: Database,
) -> None:
    # Heartbeats every 0.2 s: an agent untouched for 0.6 s is offline.
    here, elsewhere = directory(db, 0.2), directory(db, 0.2)
    live = session()
    await here.connect(live, {})
    live.held["task-1"] = "token-1"
    live.seen()
    await here.touch()
    # Another server sees it online, with the load of the last touch.
    seen = await elsewhere.get(ALICE, live.agent_id)
    assert (seen.status, seen.current_load) == ("active", 1)
    assert (await elsewhere.resolve([live.agent_id], ""))[0].online
    assert await elsewhere.counts() == (1, 1)  # (registered, online), for the metrics

    await asyncio.sleep(0.7)
    # Untouched: offline for every reader but the server holding it ...
    assert (await elsewhere.get(ALICE, live.agent_id)).status == "offline"
    assert await elsewhere.counts() == (1, 0)
    assert not (await elsewhere.resolve([live.agent_id], ""))[0].online
    assert (await here.get(ALICE, live.agent_id)).status == "active"
    # ... which never reaps its own, and brings it back with its next touch.
    assert await here.reap() == []
    live.seen()
    await here.touch()
    assert (await elsewhere.get(ALICE, live.agent_id)).status == "active"

    # The server dies (its sessions vanish without a disconnect): another one reaps the row.
    await asyncio.sleep(0.7)
    assert await elsewhere.reap() == [live.agent_id]
    assert await elsewhere.reap() == []
    assert not (await row(db, live.agent_id)).online
    kinds = await events(db, live.agent_id)
    assert kinds[-1][0] == "agent.offline" and kinds[-1][1]["reason"] == "HEARTBEAT_LOST"
    assert [k for k, _ in kinds].count("agent.offline") == 1


async def test_overloaded_on_the_transition_only(db: Database) -> None:
    agents = directory(db)
    live = session(capacity=2)
    await agents.connect(live, {})
    live.held["t1"] = "a"
    await agents.overloaded(live)  # room left: nothing
    live.held["t2"] = "b"
    await agents.overloaded(live)
    await agents.overloaded(live)  # still full: nothing more
    await agents.touch()  # full at the touch: not re-armed
    await agents.overloaded(live)
    del live.held["t1"]
    await agents.touch()  # room again: re-armed
    live.held["t3"] = "c"
    await agents.overloaded(live)
    overloaded = [d for k, d in await events(db, live.agent_id) if k == "agent.overloaded"]
    assert len(overloaded) == 2
    assert overloaded[0]["status"] == "busy"
    assert (overloaded[0]["current_load"], overloaded[0]["max_capacity"]) == (2, 2)


async def test_resolve_by_ids_and_by_key(db: Database) -> None:
    agents = directory(db)
    mine, other, theirs = session("a"), session("b"), session("c", owner="bob")
    for live in (mine, other, theirs):
        await agents.connect(live, {})
    agents.registry.remove(other)
    await agents.disconnect(other, "DISCONNECTED")

    found = await agents.resolve([mine.agent_id, other.agent_id, "unknown"], "")
    assert sorted((v.name, v.online, v.owner_id, v.key_id) for v in found) == [
        ("a", True, "alice", "key-of-alice"),
        ("b", False, "alice", "key-of-alice"),
    ]
    assert {v.name for v in await agents.resolve([], "key-of-alice")} == {"a", "b"}
    both = await agents.resolve([mine.agent_id, theirs.agent_id], "key-of-bob")
    assert [v.name for v in both] == ["c"]
    assert await agents.resolve([], "no-such-key") == []
    with pytest.raises(ValidationError):
        await agents.resolve([f"id-{i}" for i in range(101)], "")
    with pytest.raises(ValidationError):
        await agents.resolve([], "")
    assert len(await agents.resolve([f"id-{i}" for i in range(100)], "")) == 0


async def test_an_owner_registers_up_to_its_limit_of_agents(db: Database) -> None:
    agents = AgentDirectory(db=db, registry=Registry(), heartbeat_seconds=10, per_owner=2)
    first, second = session("one"), session("two")
    await agents.connect(first, {})
    await agents.connect(second, {})
    with pytest.raises(RateLimited) as refused:
        await agents.connect(session("three"), {})
    assert refused.value.reason == "AGENT_LIMIT_REACHED"
    assert refused.value.details == {"max_agents": "2"}  # ErrorInfo metadata: strings
    # An agent already registered connects again; another owner has a limit of its own.
    agents.registry.remove(first)
    await agents.disconnect(first, "AGENT_STOPPED")
    await agents.connect(session("one"), {})
    await agents.connect(session("three", owner="bob"), {})
    assert len((await agents.listing(ALICE, "", [])).agents) == 2


async def test_agents_connecting_at_once_stay_within_the_limit(db: Database) -> None:
    """First connections of one owner's agents at the same moment (parallel transactions on
    PostgreSQL) may not count the same free places: exactly the limit gets in."""
    agents = AgentDirectory(db=db, registry=Registry(), heartbeat_seconds=10, per_owner=3)
    results = await asyncio.gather(
        *(agents.connect(session(f"at-once-{n}"), {}) for n in range(12)),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 9 and all(isinstance(r, RateLimited) for r in failures), failures
    assert (await agents.listing(ALICE, "", [])).total == 3


async def test_removing_keys_the_agent_lacks_stores_nothing(db: Database) -> None:
    """A null for a key the agent's configuration does not have changes nothing, and is not
    kept: else PATCHes of ever new keys grew the stored overrides without bound (and took the
    page budget of every listing of the owner's agents)."""
    agents = directory(db)
    one = session()
    await agents.connect(one, {"model": "small", "style": "terse"})
    for batch in range(3):
        nulls: dict[str, Any] = {f"gone{batch}_{i}": None for i in range(2000)}
        change = await agents.configure(ALICE, one.agent_id, {**nulls, "style": None}, [])
        assert change.configuration == {"model": "small"}
    async with db.session() as s:
        row = (await s.execute(select(AgentRow).where(AgentRow.agent_id == one.agent_id))).scalar()
    assert row is not None and row.overrides == {"style": None}


async def test_a_page_of_large_configurations_ends_before_they_are_read(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database sizes the page's configurations first: those past the budget (after the
    first) are not read, and the page ends before them."""
    monkeypatch.setattr(domain, "PAGE_MAX_BYTES", 1000)
    agents = directory(db)
    names = [f"big-{n}" for n in range(5)]
    for name in names:  # about 400 characters of configuration each, offline
        one = session(name)
        await agents.connect(one, {"p": name[-1] * 395})
        agents.registry.remove(one)
        await agents.disconnect(one, "AGENT_STOPPED")
    first = await agents.listing(ALICE, "", [], Page(limit=10, offset=0))
    # About 0, 400 and 800 characters come before the first three; 1,200 before the fourth.
    assert [v.name for v in first.agents] == names[:3] and first.total == 5
    assert first.agents[2].configuration == {"p": "2" * 395}
    rest = await agents.listing(ALICE, "", [], Page(limit=10, offset=3))
    assert [v.name for v in rest.agents] == names[3:]
    monkeypatch.setattr(domain, "PAGE_MAX_BYTES", 0)  # one agent, however large
    assert len((await agents.listing(ALICE, "", [], Page(limit=10, offset=0))).agents) == 1
    # Without a page (the REST list always has one), every agent.
    assert len((await agents.listing(ALICE, "", [])).agents) == 5


async def test_agents_offline_past_the_retention_are_forgotten(db: Database) -> None:
    """Their rows go, in batches; an agent still online, or offline since recently, stays, and
    one forgotten that connects again is registered anew (its overrides are gone)."""
    agents = directory(db)
    live, recent = session("live"), session("recent")
    gone = [session(f"gone-{n}") for n in range(5)]
    for each in (live, recent, *gone):
        await agents.connect(each, {})
    await agents.configure(ALICE, gone[0].agent_id, {"model": "large"}, [])
    for each in (recent, *gone):
        agents.registry.remove(each)
        await agents.disconnect(each, "AGENT_STOPPED")
    long_ago = now() - timedelta(days=8)
    async with db.write() as s, s.begin():
        await s.execute(
            update(AgentRow)
            .where(AgentRow.agent_id != recent.agent_id)
            .values(last_seen_at=long_ago)
        )

    assert await agents.forget(now() - timedelta(days=7), batch=2) == 5
    left = {v.name for v in (await agents.listing(ALICE, "", [])).agents}
    assert left == {"live", "recent"}
    assert await agents.forget(now() - timedelta(days=7)) == 0
    again = session("gone-0")
    await agents.connect(again, {})
    assert again.configuration == {}
    assert (await row(db, again.agent_id)).overrides == {}


async def test_the_forgetting_job_runs_until_cancelled(db: Database) -> None:
    agents = directory(db)
    old = session("old")
    await agents.connect(old, {})
    agents.registry.remove(old)
    await agents.disconnect(old, "AGENT_STOPPED")
    job = asyncio.create_task(agents.keep_for(timedelta(seconds=0), every=0.05))
    try:
        for _ in range(100):
            if not await agents.known(old.agent_id):
                break
            await asyncio.sleep(0.05)
        assert not await agents.known(old.agent_id)
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
