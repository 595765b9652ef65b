"""SQLite run on the event loop's own thread: the driver of the embedded default.

aiosqlite gives every connection a worker thread and sends it each call: a queue put, a thread
wake-up, and a ``call_soon_threadsafe`` back through the loop's self-pipe. SQLAlchemy's adapter
makes four such calls per statement (cursor, execute, fetchall, close) and two more per
transaction, while SQLite itself answers the mesh's statements in microseconds. Profiling the
dispatch benchmark showed the hops, not SQLite, taking most of the event loop.

So these connections look like aiosqlite's to SQLAlchemy (``create_async_engine(...,
async_creator=...)``) but run each call at once on the calling thread; an ``await`` on them never
yields to the loop. What remains that could hold the loop:

- Waiting for another process's write lock (the CLI, a second process on the same file). SQLite's
  own busy handler, which sleeps on the calling thread, is allowed ``BUSY_TIMEOUT_MS``; a
  ``BEGIN`` still refused after that retries with ``asyncio.sleep`` until ``busy_seconds`` have
  passed. Writers of this process already queue on an asyncio lock first (``Database.write``).
- Checkpoints: SQLite copies the WAL back into the database file from the commit that crosses
  ``wal_autocheckpoint`` (1,000 pages), with an fsync. ``Checkpointer`` does that from a thread
  instead, and the inline connections turn automatic checkpoints off.
- A long query: the mesh's queries are indexed and bounded (pages of at most 100 rows).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

log = logging.getLogger("agentmesh.db")

BUSY_TIMEOUT_MS = 20  # the longest SQLite's busy handler may hold the loop
BUSY_FIRST_SLEEP = 0.001  # the first pause when another process holds the write lock
BUSY_MAX_SLEEP = 0.05  # pauses double up to this
CHECKPOINT_SECONDS = 1.0


def _locked(error: sqlite3.OperationalError) -> bool:
    return "locked" in str(error) or "busy" in str(error)


class InlineCursor:
    """A sqlite3 cursor behind aiosqlite's awaitable cursor API."""

    def __init__(self, owner: InlineConnection, cursor: sqlite3.Cursor) -> None:
        self._owner = owner
        self._cursor = cursor

    async def __aenter__(self) -> InlineCursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cursor.close()

    def __await__(self) -> Any:  # `await connection.cursor()`, as aiosqlite allows
        return self.__aenter__().__await__()

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> InlineCursor:
        if sql.lstrip()[:5].upper() == "BEGIN":
            await self._owner.begin(self._cursor, sql)
        elif parameters is None:
            self._cursor.execute(sql)
        else:
            self._cursor.execute(sql, parameters)
        return self

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> InlineCursor:
        self._cursor.executemany(sql, rows)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(size if size is not None else self._cursor.arraysize)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()

    async def setinputsizes(self, *sizes: Any) -> None:
        return None

    def __aiter__(self) -> InlineCursor:
        return self

    async def __anext__(self) -> Any:
        row = self._cursor.fetchone()
        if row is None:
            raise StopAsyncIteration
        return row

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value


class _RunNow:
    """Stands in for aiosqlite's request queue, which SQLAlchemy's adapter uses directly to
    set ``isolation_level``: runs the function at once and resolves its future."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except Exception as exc:
            if future is not None:
                future.set_exception(exc)
            return
        if future is not None:
            future.set_result(result)


class InlineConnection:
    """A sqlite3 connection behind the part of aiosqlite's Connection that SQLAlchemy uses."""

    def __init__(self, connection: sqlite3.Connection, *, busy_seconds: float) -> None:
        self._conn = connection
        self._connection: sqlite3.Connection | None = connection  # aiosqlite's "still open"
        self._tx = _RunNow()
        self._busy_seconds = busy_seconds

    async def begin(self, cursor: sqlite3.Cursor, sql: str) -> None:
        """Runs a BEGIN; when another process holds the write lock, waits for it in the event
        loop (doubling pauses) instead of in SQLite's busy handler, for ``busy_seconds``."""
        deadline = time.monotonic() + self._busy_seconds
        pause = BUSY_FIRST_SLEEP
        while True:
            try:
                cursor.execute(sql)
                return
            except sqlite3.OperationalError as exc:
                if not _locked(exc) or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, BUSY_MAX_SLEEP)

    def cursor(self) -> InlineCursor:
        return InlineCursor(self, self._conn.cursor())

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> InlineCursor:
        return await self.cursor().execute(sql, parameters)

    async def commit(self) -> None:
        self._conn.commit()

    async def rollback(self) -> None:
        self._conn.rollback()

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self._connection is not None:
            self._connection = None
            self._conn.close()

    async def create_function(self, *args: Any, **kw: Any) -> None:
        self._conn.create_function(*args, **kw)

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level


def connector(path: str, *, busy_seconds: float) -> Callable[[], Any]:
    """The ``async_creator`` of an engine on the SQLite file at ``path``."""

    async def connect() -> InlineConnection:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")  # readers go on during a write
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL: fsync at checkpoints, not commits
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # the Checkpointer's work
        return InlineConnection(conn, busy_seconds=busy_seconds)

    return connect


class Checkpointer:
    """Copies the WAL back into the database file every second, from a thread (PASSIVE: it
    never waits for readers or writers), so that no commit on the event loop does it."""

    def __init__(self, path: str, interval: float = CHECKPOINT_SECONDS) -> None:
        self._path = path
        self._interval = interval
        self._conn: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    def _checkpoint(self) -> None:
        if self._conn is None:
            self._conn = sqlite3.connect(self._path, timeout=1, check_same_thread=False)
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await asyncio.to_thread(self._checkpoint)
            except sqlite3.Error as exc:
                log.warning("WAL checkpoint failed: %s", exc)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                await asyncio.to_thread(self._checkpoint)
            self._conn.close()
            self._conn = None
