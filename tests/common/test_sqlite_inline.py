"""SQLite on the event loop's thread (servers/common/sqlite_inline.py): what it must not do to
the loop, and what it must still do for the data."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text

from servers.common import sqlite_inline
from servers.common.db import Database


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'inline.db'}")
    async with database.write() as s, s.begin():
        await s.execute(text("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"))
    yield database
    await database.close()


async def _longest_pause(until: asyncio.Task[object]) -> float:
    """The longest the loop went without running this ticker while `until` was running."""
    longest, last = 0.0, time.monotonic()
    while not until.done():
        await asyncio.sleep(0.002)
        moment = time.monotonic()
        longest, last = max(longest, moment - last), moment
    return longest


async def test_a_writer_waits_for_another_connections_lock_without_holding_the_loop(
    db: Database, tmp_path: Path
) -> None:
    other = sqlite3.connect(tmp_path / "inline.db", isolation_level=None)  # as another process
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO notes (body) VALUES ('theirs')")

    async def write() -> None:
        async with db.write() as s, s.begin():
            await s.execute(text("INSERT INTO notes (body) VALUES ('ours')"))

    writer = asyncio.create_task(write())
    asyncio.get_running_loop().call_later(0.3, other.execute, "COMMIT")
    started = time.monotonic()
    longest = await _longest_pause(writer)
    await writer
    assert time.monotonic() - started >= 0.25  # it did wait for the lock
    # SQLite's busy handler may hold the loop for BUSY_TIMEOUT_MS; the rest is asyncio.sleep.
    assert longest < 0.1, f"the event loop stalled for {longest * 1000:.0f} ms"
    async with db.session() as s:
        bodies = (await s.execute(text("SELECT body FROM notes ORDER BY id"))).scalars().all()
    assert bodies == ["theirs", "ours"]
    other.close()


async def test_a_lock_held_past_the_busy_wait_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "held.db"
    sqlite3.connect(path).execute("PRAGMA journal_mode=WAL").close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    conn = await sqlite_inline.connector(str(path), busy_seconds=0.2)()
    try:
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await conn.execute("BEGIN IMMEDIATE")
        assert 0.2 <= time.monotonic() - started < 2.0
    finally:
        await conn.close()
        other.execute("ROLLBACK")
        other.close()


async def test_readers_go_on_while_a_write_is_open(db: Database) -> None:
    async with db.write() as w, w.begin():
        await w.execute(text("INSERT INTO notes (body) VALUES ('uncommitted')"))
        async with db.session() as r:
            count = (await r.execute(text("SELECT count(*) FROM notes"))).scalar_one()
        assert count == 0  # WAL: the reader sees the last commit, and does not wait


async def test_commits_reach_the_database_file_while_connections_stay_open(
    db: Database, tmp_path: Path
) -> None:
    """Automatic checkpoints are off on the inline connections; the Checkpointer's thread
    copies the WAL into the database file instead."""
    path = tmp_path / "inline.db"
    before = path.stat().st_size
    async with db.write() as s, s.begin():
        for number in range(200):
            await s.execute(
                text("INSERT INTO notes (body) VALUES (:b)"), {"b": f"{number:04d}" * 256}
            )
    deadline = time.monotonic() + 5 * sqlite_inline.CHECKPOINT_SECONDS
    while path.stat().st_size <= before + 100_000 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert path.stat().st_size > before + 100_000


async def test_stopping_waits_for_a_checkpoint_running_in_its_thread(tmp_path: Path) -> None:
    """Cancelling the checkpointer's task leaves a checkpoint already in its thread running;
    stop() must not run the last checkpoint or close the connection alongside it (two threads
    on one sqlite3 connection crashed a CI run with a segmentation fault). The checkpoint here
    is slowed down so that stop() surely comes while it runs."""
    path = str(tmp_path / "wal.db")
    setup = sqlite3.connect(path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE t (x)")
    setup.commit()
    setup.close()
    inside: list[int] = []
    overlapped = False

    class Slow(sqlite_inline.Checkpointer):
        @staticmethod
        def _copy(conn: sqlite3.Connection) -> None:
            nonlocal overlapped
            overlapped = overlapped or bool(inside)
            inside.append(1)
            time.sleep(0.3)
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            inside.pop()

    checkpointer = Slow(path, interval=0.01)
    checkpointer.start()
    await asyncio.sleep(0.1)  # the first checkpoint is running in its thread
    assert inside, "no checkpoint was running"
    await checkpointer.stop()
    assert not overlapped and not inside
    await asyncio.sleep(0.4)  # a cancelled task's thread is not revived
    assert not inside
