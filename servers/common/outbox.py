"""The transactional outbox: a service writes each event in the transaction of the change it
tells of, and its relay publishes the committed events to the bus, in commit order.

Each service owns its own outbox table (``<service>_outbox``), declared with ``OutboxMixin``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

from sqlalchemy import (
    JSON,
    DateTime,
    Integer,
    String,
    Table,
    bindparam,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, Session, mapped_column

from .bus import Bus, BusUnavailable, owner_index
from .clock import aware, now
from .db import Database
from .observability import OBSERVED

log = logging.getLogger("agentmesh.outbox")

# While events flow (the last read found some), the relay waits LINGER seconds before the next
# read, so that one read covers the commits of that moment instead of one read per commit. An
# event after a quiet spell goes at once.
LINGER = 0.002

# The topic every service's events are published to.
EVENTS_TOPIC = "events"


class OutboxMixin:
    """The columns of an outbox table. The subclass names the table and its index on
    (published_at, id), which the relay scans."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_type: Mapped[str] = mapped_column(String(64))
    # The task, agent or user the event is about.
    subject_id: Mapped[str] = mapped_column(String(36))
    # The user who may see it (besides admins).
    owner_id: Mapped[str] = mapped_column(String(36))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


# Relays by outbox model: a commit that wrote events to a model's table wakes its relays.
_relays: dict[type, list[Relay]] = {}


def write_event(
    session: AsyncSession,
    model: type[OutboxMixin],
    *,
    event_type: str,
    subject_id: str,
    owner_id: str,
    data: dict[str, Any],
    at: datetime,
) -> None:
    """Writes an event in the session's transaction. The rows of a transaction are inserted
    together as it commits (one INSERT for all of them, not an ORM flush each), and the
    commit wakes the model's relays; a rollback of the transaction drops them. Not for use
    inside a savepoint that may roll back on its own: its rollback would not drop them."""
    row = {
        "event_type": event_type,
        "subject_id": subject_id,
        "owner_id": owner_id,
        "data": data,
        "created_at": at,
    }
    session.info.setdefault("outbox_rows", {}).setdefault(model, []).append(row)
    session.info.setdefault("outbox", set()).add(model)


_inserts: dict[type[OutboxMixin], Any] = {}


@event.listens_for(Session, "before_commit")
def _insert_events(session: Session) -> None:
    staged: dict[type[OutboxMixin], list[dict[str, Any]]] = session.info.pop("outbox_rows", {})
    for model, rows in staged.items():
        statement = _inserts.get(model)
        if statement is None:
            table = cast(Table, model.__table__)  # type: ignore[attr-defined]
            statement = _inserts[model] = insert(table)
        # On the connection: the session's own execute adds ORM machinery a plain insert
        # does not need. One row goes as a single execute, not an executemany.
        session.connection().execute(statement, rows[0] if len(rows) == 1 else rows)


@event.listens_for(Session, "after_flush")
def _note_events(session: Session, _context: Any) -> None:
    for obj in session.new:
        if isinstance(obj, OutboxMixin):
            session.info.setdefault("outbox", set()).add(type(obj))


@event.listens_for(Session, "after_commit")
def _wake_relays(session: Session) -> None:
    for model in session.info.pop("outbox", ()):
        for relay in _relays.get(model, ()):
            relay.notify()


@event.listens_for(Session, "after_rollback")
def _forget_events(session: Session) -> None:
    session.info.pop("outbox", None)
    session.info.pop("outbox_rows", None)


class EventRow(Protocol):
    """An outbox row as read: the mapped class, or a plain row of its table."""

    @property
    def event_type(self) -> str: ...
    @property
    def subject_id(self) -> str: ...
    @property
    def owner_id(self) -> str: ...
    @property
    def data(self) -> dict[str, Any]: ...
    @property
    def created_at(self) -> datetime: ...


def event_fields(row: EventRow) -> dict[str, str]:
    """An outbox row as the flat string fields of a bus entry (see servers/messaging/events.py
    for the reading side)."""
    return {
        "type": row.event_type,
        "subject": row.subject_id,
        "owner": row.owner_id,
        "time": aware(row.created_at).isoformat(),
        "data": json.dumps(row.data, separators=(",", ":"), default=str),
    }


class Relay:
    """Publishes a service's committed outbox rows to the bus's "events" topic, oldest first,
    and marks them published. Woken by each commit that wrote events in this process, and polls
    for the rest (rows written by other processes, or before a restart).

    A row is published at least once: when the process dies between publishing and marking,
    the row is published again after the restart. While the bus is down the rows wait and the
    relay retries with backoff; nothing is dropped.

    On PostgreSQL the batch is read FOR UPDATE, so two replicas relaying the same table take
    turns instead of publishing the same rows twice. SQLite serves one process, whose relay
    reads without holding the write lock while it publishes, remembers how far it got, and marks
    rows published in one write per ``mark_delay`` at most: SQLite has one writer, and a marking
    write per event would double the writes of every change.
    """

    def __init__(
        self,
        *,
        db: Database,
        model: type[OutboxMixin],
        bus: Bus,
        retention_seconds: int,
        max_len: int,
        topic: str = EVENTS_TOPIC,
        batch: int = 200,
        poll: float = 1.0,
        keep_published: timedelta = timedelta(hours=1),
        mark_delay: float = 0.2,
        linger: float = LINGER,
    ) -> None:
        self._db = db
        self._linger = linger
        self._model = model
        self._bus = bus
        self._topic = topic
        self._retention_ms = retention_seconds * 1000
        self._max_len = max_len
        self._batch = batch
        self._poll = poll
        self._keep = keep_published
        self._wake = asyncio.Event()
        self._mark_delay = mark_delay
        # SQLite: the last row id published by this relay, and the published rows not yet
        # marked, with when they must be.
        self._high = 0
        self._unmarked: list[int] = []
        # Built once: the relay reads after every commit that wrote an event.
        table = cast(Table, model.__table__)  # type: ignore[attr-defined]
        unpublished = (
            select(table).where(table.c.published_at.is_(None)).order_by(table.c.id).limit(batch)
        )
        # SQLite: plain rows after the last one published here. PostgreSQL: the mapped rows,
        # locked, so that replicas take turns.
        self._after_high = unpublished.where(table.c.id > bindparam("high"))
        self._locked = (
            select(model)
            .where(model.published_at.is_(None))
            .order_by(model.id)
            .limit(batch)
            .with_for_update()
        )
        self._mark_due = 0.0
        self.up = True
        self.published = 0

    def notify(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        _relays.setdefault(self._model, []).append(self)
        delay = 0.1
        last_cleanup = 0.0
        try:
            while True:
                self._wake.clear()
                try:
                    count = await self.publish_pending()
                except BusUnavailable:
                    if self.up:
                        log.warning("bus unavailable; events wait in the outbox")
                    self.up = False
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                except SQLAlchemyError as exc:
                    log.warning("outbox read failed: %s", exc)
                    await asyncio.sleep(self._poll)
                    continue
                if not self.up:
                    log.info("bus available again; outbox relay resumed")
                self.up, delay = True, 0.1
                if count >= self._batch:
                    continue
                if time.monotonic() - last_cleanup > 60:
                    last_cleanup = time.monotonic()
                    await self.forget_published()
                if count and self._linger:
                    await asyncio.sleep(self._linger)
                    if self._wake.is_set():
                        continue
                wait = self._poll
                if self._unmarked:
                    wait = min(wait, max(0.0, self._mark_due - time.monotonic()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
        finally:
            _relays[self._model].remove(self)
            if self._unmarked:
                # Best effort; what stays unmarked is published again after the restart.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await self.mark_published()

    async def publish_pending(self) -> int:
        """Publishes one batch of unpublished rows; returns how many."""
        if self._db.is_sqlite:
            async with self._db.session() as s:
                rows = list((await s.execute(self._after_high, {"high": self._high})).all())
            for row in rows:
                await self._publish([row])
                self._high = row.id
                if not self._unmarked:
                    self._mark_due = time.monotonic() + self._mark_delay
                self._unmarked.append(row.id)
            if self._unmarked and (
                len(self._unmarked) >= self._batch or time.monotonic() >= self._mark_due
            ):
                await self.mark_published()
            return len(rows)
        async with self._db.write() as s, s.begin():
            rows = list(await s.scalars(self._locked))
            if rows:
                await self._publish(rows)
                await self._mark(s, [r.id for r in rows])
        return len(rows)

    async def _publish(self, rows: Sequence[EventRow]) -> None:
        for row in rows:
            # Indexed by owner: a user's list reads its own events, not everyone's.
            await self._bus.publish(
                self._topic,
                event_fields(row),
                retention_ms=self._retention_ms,
                max_len=self._max_len,
                index=owner_index(self._topic, row.owner_id) if row.owner_id else "",
            )
            self.published += 1
            OBSERVED.published(row.event_type)

    async def _mark(self, s: AsyncSession, ids: list[int]) -> None:
        model = self._model
        await s.execute(
            update(model)
            .where(model.id.in_(ids), model.published_at.is_(None))
            .values(published_at=now())
        )

    async def mark_published(self) -> None:
        """SQLite: marks the rows this relay published and has not marked yet."""
        ids = list(self._unmarked)
        if not ids:
            return
        async with self._db.write() as s, s.begin():
            await self._mark(s, ids)
        del self._unmarked[: len(ids)]

    async def forget_published(self) -> None:
        """Deletes rows published long ago: the bus keeps the events from then on."""
        model = self._model
        try:
            async with self._db.write() as s, s.begin():
                await s.execute(delete(model).where(model.published_at < now() - self._keep))
        except SQLAlchemyError as exc:
            log.warning("outbox cleanup failed: %s", exc)
