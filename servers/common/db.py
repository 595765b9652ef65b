"""The SQLAlchemy 2.0 async engine and Alembic migrations applied at start.

One DATABASE_URL: SQLite in the data directory by default (WAL, foreign keys on), run on the
event loop's thread by sqlite_inline.py; PostgreSQL through asyncpg in production. Each service
owns its tables and its migration history, kept in its own version table
(alembic_version_<service>).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    ColumnElement,
    Select,
    Subquery,
    Table,
    Text,
    bindparam,
    event,
    func,
    select,
    text,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from . import sqlite_inline
from .observability import count_statement

log = logging.getLogger("agentmesh.db")
SQLITE_BUSY_SECONDS = 10.0  # how long a writer waits for another process's write lock


def _sqlite_manual_begin(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event, not the driver, open transactions.
    dbapi_connection.isolation_level = None


class _InTurn:
    """A write session entered only while holding the process's SQLite write turn."""

    def __init__(self, session: AsyncSession, turn: asyncio.Lock) -> None:
        self._session = session
        self._turn = turn

    async def __aenter__(self) -> AsyncSession:
        await self._turn.acquire()
        try:
            return await self._session.__aenter__()
        except BaseException:
            self._turn.release()
            raise

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self._session.__aexit__(*exc)
        finally:
            self._turn.release()


class Database:
    """An async engine and its session factories; ``close()`` is safe to call twice.

    ``session()`` is for reads. ``write()`` is for transactions that change data: on SQLite it
    comes from a second engine whose transactions start with BEGIN IMMEDIATE (WAL keeps readers
    going meanwhile); on PostgreSQL both are the same engine.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = url.split(":///", 1)[1] if ":///" in url else ""
            if not path or path == ":memory:":
                raise ValueError("a SQLite DATABASE_URL must name a file: sqlite+aiosqlite:///PATH")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # Inline connections (sqlite_inline.py): statements run on the loop's thread.
            connect = sqlite_inline.connector(path, busy_seconds=SQLITE_BUSY_SECONDS)
            self.engine: AsyncEngine = create_async_engine(url, async_creator=connect)
            self.writer: AsyncEngine = create_async_engine(url, async_creator=connect)
            event.listen(self.writer.sync_engine, "connect", _sqlite_manual_begin)
            event.listen(self.writer.sync_engine, "begin", sqlite_inline.begin_immediate)
        else:
            self.engine = create_async_engine(url, pool_pre_ping=True, pool_size=10)
            self.writer = self.engine
        self._write_turn = asyncio.Lock() if self.is_sqlite else None
        self._checkpointer = sqlite_inline.Checkpointer(path) if self.is_sqlite else None
        if self.is_sqlite:
            # Sessions without greenlets (sqlite_inline.InlineSession), typed as the
            # AsyncSession whose interface they keep.
            self._sync_engines: tuple[Engine, ...] = (
                sqlite_inline.engine(path, writer=False),
                sqlite_inline.engine(path, writer=True),
            )
            reads, writes = (
                sqlite_inline.sessions(e, busy_seconds=SQLITE_BUSY_SECONDS)
                for e in self._sync_engines
            )
            self._reads = cast(Callable[[], AsyncSession], reads)
            self._writes = cast(Callable[[], AsyncSession], writes)
        else:
            self._sync_engines = ()
            self._reads = async_sessionmaker(self.engine, expire_on_commit=False)
            self._writes = async_sessionmaker(self.writer, expire_on_commit=False)
        self._closed = False
        if not self.is_sqlite:  # the observability endpoints' db spans (SQLite: sqlite_inline)
            event.listen(self.engine.sync_engine, "before_cursor_execute", count_statement)

    def sync_engines(self) -> list[Engine]:
        """Every engine that runs this database's statements (for instrumentation)."""
        engines = [self.engine.sync_engine, *self._sync_engines]
        if self.writer is not self.engine:
            engines.append(self.writer.sync_engine)
        return engines

    def _started(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.start()

    def session(self) -> AsyncSession:
        """A session for reading."""
        return self._reads()

    def write(self) -> contextlib.AbstractAsyncContextManager[AsyncSession]:
        """A session for a transaction that writes: ``async with db.write() as s, s.begin():``.

        On SQLite, the writers of this process take turns on an asyncio lock before they ask
        SQLite for its write lock. Two connections contending inside SQLite would otherwise
        meet its busy handler, which backs off by sleeping (1, 2, 5, ... 100 ms): tens of
        milliseconds lost per collision, where a queue in the event loop loses none."""
        self._started()
        if self._write_turn is None:
            return self._writes()
        return _InTurn(self._writes(), self._write_turn)

    async def ping(self) -> bool:
        """Whether the database answers a trivial query."""
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception as exc:  # any failure means "not ready"; the reason goes to the log
            log.warning("database ping failed: %s", exc)
            return False

    async def migrate(self, service: str, script_location: Path) -> None:
        """Applies the service's migrations up to head (under a lock on PostgreSQL, so that
        replicas starting together do not race)."""

        def upgrade(conn: Connection) -> None:
            if conn.dialect.name == "postgresql":
                conn.execute(_TURN, {"k": service})
            cfg = Config()
            cfg.set_main_option("script_location", str(script_location))
            cfg.attributes["connection"] = conn
            cfg.attributes["version_table"] = f"alembic_version_{service}"
            command.upgrade(cfg, "head")

        async with self.writer.begin() as conn:
            await conn.run_sync(upgrade)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.engine.dispose()
            if self.writer is not self.engine:
                await self.writer.dispose()
            for sync_engine in self._sync_engines:
                sync_engine.dispose()
            if self._checkpointer is not None:
                await self._checkpointer.stop()

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# A PostgreSQL lock held until the transaction ends, named by a text key's 64-bit hash (two
# keys that hash alike would only take turns needlessly).
_TURN = text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))")


async def take_turn(session: AsyncSession, key: str) -> None:
    """Inside a write transaction: the transactions that take a turn on the same key run one
    after another from here to their end. For a decision a row lock cannot guard, such as a
    count that an INSERT must not push past its cap. On PostgreSQL, an advisory transaction
    lock; SQLite's writers take turns on the whole database already."""
    connection = await session.connection()
    if connection.dialect.name == "postgresql":
        await session.execute(_TURN, {"k": key})


class InsertOrNothing:
    """``INSERT ... ON CONFLICT (conflict) DO NOTHING RETURNING returning`` on ``table``, built
    once per dialect: one statement where the ORM would flush in a savepoint to turn a
    unique-key collision into "a concurrent twin won"."""

    def __init__(self, table: Table, *, conflict: Sequence[str], returning: ColumnElement[Any]):
        self._statements = {
            name: dialect.insert(table)
            .on_conflict_do_nothing(index_elements=list(conflict))
            .returning(returning)
            for name, dialect in (("sqlite", sqlite), ("postgresql", postgresql))
        }

    async def __call__(self, session: AsyncSession, values: dict[str, Any]) -> Any:
        """The returned column of the new row; None when the conflict kept it from being
        written."""
        connection = await session.connection()
        found = await session.execute(self._statements[connection.dialect.name], values)
        return found.scalar_one_or_none()


def stored_chars(*columns: Any) -> ColumnElement[Any]:
    """The characters of these columns as the database stores them (a JSON column as its
    text; NULL as none): the size that within_budget's pages are cut by."""
    total: Any = None
    for column in columns:
        chars = func.coalesce(func.length(sql_cast(column, Text)), 0)
        total = chars if total is None else total + chars
    return cast(ColumnElement[Any], total)


def within_budget(window: Subquery, key: str, order: Sequence[ColumnElement[Any]]) -> Select[Any]:
    """The ``key`` column of the rows of ``window`` (one page of a list, with a ``size``
    column: the characters of its large fields as the database stores them) up to the first
    whose size, added to those before it in ``order``, passes the bound parameter "budget".
    A list that selects its rows by these keys reads a page's large fields only within the
    budget (and always its first row); the sizes come from the same scan as the page."""
    running = func.sum(window.c.size).over(order_by=order)
    before = select(window.c[key], (running - window.c.size).label("before")).subquery()
    return select(before.c[key]).where(before.c.before <= bindparam("budget"))
