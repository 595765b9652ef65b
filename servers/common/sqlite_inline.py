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
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from .observability import count_sql

log = logging.getLogger("agentmesh.db")

BUSY_TIMEOUT_MS = 20  # the longest SQLite's busy handler may hold the loop
BUSY_FIRST_SLEEP = 0.001  # the first pause when another process holds the write lock
BUSY_MAX_SLEEP = 0.05  # pauses double up to this
CHECKPOINT_SECONDS = 1.0


def _locked(error: BaseException) -> bool:
    return "locked" in str(error) or "busy" in str(error)


async def _until_unlocked(
    attempt: Callable[[], Any],
    busy_seconds: float,
    errors: type[Exception] | tuple[type[Exception], ...],
    undo: Callable[[], Any] = lambda: None,
) -> Any:
    """``attempt()``'s result; while it fails because another process holds the write lock,
    ``undo()`` and try again after doubling pauses in the event loop (not in SQLite's busy
    handler, which sleeps on the loop's thread), for ``busy_seconds`` at most."""
    deadline = time.monotonic() + busy_seconds
    pause = BUSY_FIRST_SLEEP
    while True:
        try:
            return attempt()
        except errors as exc:
            undo()
            if not _locked(exc) or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, BUSY_MAX_SLEEP)


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
        """Runs a BEGIN, waiting in the event loop for another process's write lock."""
        await _until_unlocked(
            lambda: cursor.execute(sql), self._busy_seconds, sqlite3.OperationalError
        )

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
        conn.set_trace_callback(count_sql)
        return InlineConnection(conn, busy_seconds=busy_seconds)

    return connect


class Checkpointer:
    """Copies the WAL back into the database file every second, from a thread (PASSIVE: it
    never waits for readers or writers), so that no commit on the event loop does it.

    Its connection is used by one thread at a time, under a lock: cancelling the loop's task
    does not stop a checkpoint already running in its thread, and the last checkpoint and the
    close on stop must wait for it (two threads on one sqlite3 connection, or a close under a
    running statement, crash the process)."""

    def __init__(self, path: str, interval: float = CHECKPOINT_SECONDS) -> None:
        self._path = path
        self._interval = interval
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None

    def _checkpoint(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._conn is None:
                self._conn = sqlite3.connect(self._path, timeout=1, check_same_thread=False)
            self._copy(self._conn)

    @staticmethod
    def _copy(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _close(self) -> None:
        """The last checkpoint, then the connection closes; after a running one ends."""
        with self._lock:
            self._closed = True
            if self._conn is None:
                return
            try:
                self._copy(self._conn)
            except sqlite3.Error as exc:
                log.warning("last WAL checkpoint failed: %s", exc)
            finally:
                self._conn.close()
                self._conn = None

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
        await asyncio.to_thread(self._close)


# --- Sessions without greenlets ---
#
# SQLAlchemy's AsyncSession runs each call of the sync Session inside a new greenlet and switches
# into it and out of it for every driver call: about 0.4 ms of Python for a transaction of one
# statement here, while SQLite takes 0.02 ms. As the connections above never wait, the mesh's
# SQLite sessions are plain sync Sessions on the loop's thread behind the part of AsyncSession's
# interface the mesh uses (InlineSession). PostgreSQL keeps AsyncSession and asyncpg.


def begin_immediate(conn: Connection) -> None:
    """The "begin" of a writer engine. A deferred SQLite transaction that reads, then writes,
    fails at once ("database is locked") when another writer committed in between, which no
    busy wait covers; writers therefore take the write lock up front."""
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _begin_immediate_raw(conn: Connection) -> None:
    """begin_immediate for the sync engines below, whose driver connection is sqlite3's own:
    straight to it, without a trip through SQLAlchemy's statement machinery (one per write)."""
    driver = conn.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    driver.execute("BEGIN IMMEDIATE")


def engine(path: str, *, writer: bool) -> Engine:
    """A sync engine on the SQLite file. A writer's transactions begin with BEGIN IMMEDIATE
    (InlineSession.begin waits for another process's lock in the event loop)."""

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(
            path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            check_same_thread=False,
            # A writer's BEGIN is SQLAlchemy's (below); a reader's statements need none.
            isolation_level=None if writer else "DEFERRED",
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.set_trace_callback(count_sql)
        return conn

    # Never more than pool_size idle connections, but never a wait for one either: a session
    # that waited here would hold the event loop, and with it every session that could return
    # a connection.
    made = create_engine(
        f"sqlite:///{path}", creator=connect, poolclass=QueuePool, pool_size=8, max_overflow=-1
    )
    if writer:
        event.listen(made, "begin", _begin_immediate_raw)
    return made


class _Begun:
    """``async with session.begin():`` over a sync Session. On a writer, BEGIN IMMEDIATE that
    meets another process's write lock is retried with asyncio.sleep, as in
    InlineConnection.begin."""

    def __init__(self, session: InlineSession) -> None:
        self._session = session
        self._transaction: Any = None

    async def __aenter__(self) -> Any:
        sync = self._session.sync_session

        def begin() -> Any:
            self._transaction = sync.begin()
            sync.connection()  # BEGIN (IMMEDIATE) now, not at the first statement
            return self._transaction

        return await _until_unlocked(
            begin,
            self._session.busy_seconds,
            # sqlite3's own from the engine's begin hook (_begin_immediate_raw)
            (OperationalError, sqlite3.OperationalError),
            undo=lambda: self._transaction.rollback(),
        )

    async def __aexit__(self, *exc: Any) -> None:
        self._transaction.__exit__(*exc)


class _Nested:
    def __init__(self, sync: Session) -> None:
        self._context = sync.begin_nested()

    async def __aenter__(self) -> Any:
        return self._context.__enter__()

    async def __aexit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)


class InlineSession:
    """The part of AsyncSession's interface the mesh's stores use, over a sync Session whose
    calls run at once. ``Database`` hands these out as AsyncSession on SQLite."""

    def __init__(self, sync: Session, *, busy_seconds: float) -> None:
        self.sync_session = sync
        self.busy_seconds = busy_seconds

    async def __aenter__(self) -> InlineSession:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.sync_session.close()

    def begin(self) -> _Begun:
        return _Begun(self)

    def begin_nested(self) -> _Nested:
        return _Nested(self.sync_session)

    @property
    def info(self) -> dict[Any, Any]:
        return self.sync_session.info

    async def execute(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return self.sync_session.execute(statement, params, **kw)

    async def scalars(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return self.sync_session.scalars(statement, params, **kw)

    async def scalar(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return self.sync_session.scalar(statement, params, **kw)

    async def get(self, entity: Any, ident: Any, **kw: Any) -> Any:
        return self.sync_session.get(entity, ident, **kw)

    def add(self, instance: object) -> None:
        self.sync_session.add(instance)

    def add_all(self, instances: Iterable[object]) -> None:
        self.sync_session.add_all(instances)

    async def delete(self, instance: object) -> None:
        self.sync_session.delete(instance)

    async def flush(self) -> None:
        self.sync_session.flush()

    async def connection(self, **kw: Any) -> Any:
        return self.sync_session.connection(**kw)

    async def commit(self) -> None:
        self.sync_session.commit()

    async def rollback(self) -> None:
        self.sync_session.rollback()

    async def close(self) -> None:
        self.sync_session.close()


def sessions(engine_: Engine, *, busy_seconds: float) -> Callable[[], InlineSession]:
    """A factory of InlineSessions on the engine."""
    make = sessionmaker(engine_, expire_on_commit=False)
    return lambda: InlineSession(make(), busy_seconds=busy_seconds)
