"""The outbox relay (servers/common/outbox.py) on SQLite and PostgreSQL: committed events reach
the bus in commit order, each once, woken by the commit itself; while the bus is down they wait
in the outbox and none is lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from servers.common.bus import Bus
from servers.common.clock import now
from servers.common.db import Database
from servers.common.membus import MemoryBus
from servers.common.outbox import EVENTS_TOPIC, Relay, write_event
from servers.common.redisbus import RedisBus
from servers.launcher import free_port
from servers.mesh import MIGRATIONS
from servers.tasks.models import OutboxRow


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    folder = MIGRATIONS["tasks"]
    assert folder is not None
    await database.migrate("tasks", folder)
    yield database
    await database.close()


def relay(db: Database, bus: Bus, **kw: object) -> Relay:
    return Relay(db=db, model=OutboxRow, bus=bus, retention_seconds=3600, max_len=10_000, **kw)  # type: ignore[arg-type]


async def write_events(db: Database, *subjects: str) -> None:
    async with db.write() as s, s.begin():
        for subject in subjects:
            write_event(
                s,
                OutboxRow,
                event_type="task.created",
                subject_id=subject,
                owner_id="owner-1",
                data={"task_id": subject, "n": 1},
                at=now(),
            )


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def unpublished(db: Database) -> int:
    async with db.session() as s:
        count = await s.scalar(
            select(func.count()).select_from(OutboxRow).where(OutboxRow.published_at.is_(None))
        )
    return int(count or 0)


async def test_committed_events_reach_the_bus_in_order_once(db: Database) -> None:
    bus = MemoryBus()
    await write_events(db, "a", "b")
    await write_events(db, "c")
    r = relay(db, bus, batch=2)
    assert await r.publish_pending() == 2
    assert await r.publish_pending() == 1
    assert await r.publish_pending() == 0
    await r.mark_published()  # SQLite defers marking (at most mark_delay); PostgreSQL has marked
    entries = await bus.range(EVENTS_TOPIC, "0-0", 10)
    assert [e.fields["subject"] for e in entries] == ["a", "b", "c"]
    first = entries[0].fields
    assert first["type"] == "task.created" and first["owner"] == "owner-1"
    assert json.loads(first["data"]) == {"task_id": "a", "n": 1}
    assert await unpublished(db) == 0


async def test_a_rolled_back_change_leaves_no_event(db: Database) -> None:
    bus = MemoryBus()
    with pytest.raises(RuntimeError):
        async with db.write() as s, s.begin():
            write_event(
                s,
                OutboxRow,
                event_type="task.created",
                subject_id="never",
                owner_id="owner-1",
                data={},
                at=now(),
            )
            raise RuntimeError("the change failed")
    await write_events(db, "kept")
    r = relay(db, bus)
    assert await r.publish_pending() == 1
    entries = await bus.range(EVENTS_TOPIC, "0-0", 10)
    assert [e.fields["subject"] for e in entries] == ["kept"]


async def test_a_commit_wakes_the_relay(db: Database) -> None:
    bus = MemoryBus()
    # With an hour between polls, only the commit itself can wake the relay in time.
    running = asyncio.create_task(relay(db, bus, poll=3600).run())
    try:
        await asyncio.sleep(0.1)
        await write_events(db, "woken")
        entries = await bus.read(EVENTS_TOPIC, "0-0", count=1, block=5)
        assert [e.fields["subject"] for e in entries] == ["woken"]
    finally:
        await stop(running)


async def test_two_relays_publish_each_event_once(db: Database) -> None:
    bus = MemoryBus()
    await write_events(db, *(f"s{i}" for i in range(60)))
    a, b = relay(db, bus, batch=7), relay(db, bus, batch=7)

    async def drain(r: Relay) -> None:
        while await r.publish_pending():
            pass

    if db.is_sqlite:
        # SQLite serves one process, with one relay per table; take turns as that process does.
        await drain(a)
        await a.mark_published()  # its deferred write, before the next relay starts
        await drain(b)
    else:
        await asyncio.gather(drain(a), drain(b))
    entries = await bus.range(EVENTS_TOPIC, "0-0", 100)
    assert [e.fields["subject"] for e in entries] == [f"s{i}" for i in range(60)]


async def test_events_wait_in_the_outbox_while_the_bus_is_down(db: Database) -> None:
    dead = RedisBus(f"redis://127.0.0.1:{free_port()}/0", prefix="test-outbox:")
    await write_events(db, "kept")
    running = asyncio.create_task(relay(db, dead, poll=0.1).run())
    await asyncio.sleep(1.0)
    await stop(running)
    await dead.close()
    assert await unpublished(db) == 1
    # The next relay, on a bus that works, publishes it.
    bus = MemoryBus()
    assert await relay(db, bus).publish_pending() == 1
    assert [e.fields["subject"] for e in await bus.range(EVENTS_TOPIC, "0-0", 5)] == ["kept"]


async def test_published_rows_are_forgotten_after_a_while(db: Database) -> None:
    bus = MemoryBus()
    await write_events(db, "old")
    r = relay(db, bus, keep_published=timedelta(0))
    await r.publish_pending()
    await r.mark_published()
    await write_events(db, "new")
    await r.forget_published()
    async with db.session() as s:
        left = list(await s.scalars(select(OutboxRow.subject_id)))
    assert left == ["new"]  # unpublished rows stay, whatever their age


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_sqlite_marks_published_rows_in_one_deferred_write(db: Database) -> None:
    # SQLite only: PostgreSQL marks each batch in the transaction that read it FOR UPDATE.
    assert db.is_sqlite
    bus = MemoryBus()
    r = relay(db, bus, mark_delay=3600)
    await write_events(db, "a")
    assert await r.publish_pending() == 1
    await write_events(db, "b")
    assert await r.publish_pending() == 1
    # Published, not yet marked, and still not published twice.
    assert await unpublished(db) == 2
    assert await r.publish_pending() == 0
    assert [e.fields["subject"] for e in await bus.range(EVENTS_TOPIC, "0-0", 5)] == ["a", "b"]
    await r.mark_published()
    assert await unpublished(db) == 0
    # A relay that starts afresh (a restart) finds nothing left to publish.
    assert await relay(db, bus).publish_pending() == 0
