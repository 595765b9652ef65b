"""Repositories of the messaging tables.

The statements of every send, delivery and acknowledgement are built once, here, with bound
parameters: building a statement and its cache key each time costs more Python than SQLite
takes to run it. The rest are built per call.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Select, Table, and_, bindparam, delete, exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from servers.common.db import InsertOrNothing, stored_chars, within_budget

from .models import MessageRow

Position = tuple[datetime, int]  # (created_at, seq): a place in an inbox, oldest first

_table = cast(Table, MessageRow.__table__)
_c = _table.c
_COLUMNS = tuple(c.key for c in _table.columns if c.key != "seq")
# A twin's message_id makes the insert write nothing and return no seq.
_INSERT = InsertOrNothing(_table, conflict=["message_id"], returning=_c.seq)
_GET = select(MessageRow).where(MessageRow.message_id == bindparam("m_id"))
_HELD = select(func.count()).select_from(
    select(_c.seq)
    .where(
        _c.to_agent == bindparam("agent"),
        _c.acked_at.is_(None),
        _c.expires_at > bindparam("at"),
    )
    .limit(bindparam("cap"))
    .subquery()
)
_ACK = (
    update(_table)
    .where(_c.message_id == bindparam("m_id"), _c.acked_at.is_(None))
    .values(acked_at=bindparam("at"))
)
_UNACK = update(_table).where(_c.message_id == bindparam("m_id")).values(acked_at=None)
_ACK_ANSWERED = (
    update(_table)
    .where(
        _c.to_agent == bindparam("responder"),
        _c.correlation_id == bindparam("corr"),
        _c.from_agent == bindparam("requester"),
        _c.type == "request",
        _c.acked_at.is_(None),
    )
    .values(acked_at=bindparam("at"))
)


@functools.cache
def _inbox_page(unacked: bool) -> Select[Any]:
    """MessageStore.page's statement, built once per filter (see within_budget)."""
    where: list[Any] = [_c.to_agent == bindparam("agent"), _c.expires_at > bindparam("at")]
    if unacked:
        where.append(_c.acked_at.is_(None))
    window = (
        select(_c.seq, _c.created_at, stored_chars(_c.payload).label("size"))
        .where(*where)
        .order_by(_c.created_at, _c.seq)
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
        .subquery()
    )
    kept = within_budget(window, "seq", (window.c.created_at, window.c.seq))
    return (
        select(MessageRow)
        .where(MessageRow.seq.in_(kept))
        .order_by(MessageRow.created_at, MessageRow.seq)
    )


class MessageStore:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def add(self, row: MessageRow) -> bool:
        """Inserts the message and sets its ``seq``; False when its message_id is taken (a
        concurrent twin won), in which case nothing was written."""
        seq = await _INSERT(self._s, {key: getattr(row, key) for key in _COLUMNS})
        if seq is None:
            return False
        row.seq = seq
        return True

    async def get(self, message_id: str, *, fresh: bool = False) -> MessageRow | None:
        """The message; ``fresh``: read again even if this session holds it already."""
        query = _GET.execution_options(populate_existing=True) if fresh else _GET
        found = await self._s.execute(query, {"m_id": message_id})
        return found.scalars().first()

    async def unacked_count(self, agent_id: str, at: datetime, *, cap: int) -> int:
        """How many unacknowledged, unexpired messages ``agent_id`` holds, counted up to
        ``cap``: every send asks, and a full inbox must not cost a full count each time."""
        total = await self._s.execute(_HELD, {"agent": agent_id, "at": at, "cap": cap})
        return int(total.scalar_one())

    async def page(
        self,
        agent_id: str,
        *,
        unacked: bool,
        at: datetime,
        limit: int,
        offset: int,
        budget: int,
    ) -> tuple[Sequence[MessageRow], int]:
        """A page of the inbox, oldest first, and the number of messages in it. The page ends
        early, after its first message, where the payloads pass ``budget`` characters (as the
        database stores them): its rows are never read whole beyond that."""
        where: list[Any] = [MessageRow.to_agent == agent_id, MessageRow.expires_at > at]
        if unacked:
            where.append(MessageRow.acked_at.is_(None))
        total = (
            await self._s.execute(select(func.count()).select_from(MessageRow).where(*where))
        ).scalar_one()
        rows = await self._s.execute(
            _inbox_page(unacked),
            {"agent": agent_id, "at": at, "limit": limit, "offset": offset, "budget": budget},
        )
        return rows.scalars().all(), int(total)

    async def deliverable(
        self,
        agent_id: str,
        *,
        at: datetime,
        since: datetime | None,
        after: Position | None,
        limit: int,
        ids: Collection[str] = (),
    ) -> Sequence[MessageRow]:
        """What an inbox stream sends: unacknowledged, unexpired messages created at or after
        ``since``, oldest first, after ``after`` (and among ``ids``, when given). Responses
        that a SendRequest of the recipient is waiting for (from the agent it asked) are left
        to that waiter."""
        request = aliased(MessageRow)
        awaited = exists().where(
            request.from_agent == MessageRow.to_agent,
            request.to_agent == MessageRow.from_agent,
            request.correlation_id == MessageRow.correlation_id,
            request.type == "request",
            request.awaited_until > at,
        )
        where: list[Any] = [
            MessageRow.to_agent == agent_id,
            MessageRow.acked_at.is_(None),
            MessageRow.expires_at > at,
            ~and_(MessageRow.type == "response", awaited),
        ]
        if ids:
            where.append(MessageRow.message_id.in_(list(ids)))
        if since is not None:
            where.append(MessageRow.created_at >= since)
        if after is not None:
            created, seq = after
            where.append(
                (MessageRow.created_at > created)
                | and_(MessageRow.created_at == created, MessageRow.seq > seq)
            )
        rows = await self._s.execute(
            select(MessageRow)
            .where(*where)
            .order_by(MessageRow.created_at, MessageRow.seq)
            .limit(limit)
        )
        return rows.scalars().all()

    async def response_to(
        self, agent_id: str, responder: str, correlation_id: str, *, since: datetime, at: datetime
    ) -> MessageRow | None:
        """The first unexpired response from ``responder`` to ``agent_id`` carrying
        ``correlation_id``, written at or after ``since`` (the request's own time)."""
        found = await self._s.execute(
            select(MessageRow)
            .where(
                MessageRow.to_agent == agent_id,
                MessageRow.from_agent == responder,
                MessageRow.correlation_id == correlation_id,
                MessageRow.type == "response",
                MessageRow.created_at >= since,
                MessageRow.expires_at > at,
            )
            .order_by(MessageRow.created_at, MessageRow.seq)
            .limit(1)
        )
        return found.scalars().first()

    async def ack(self, message_id: str, at: datetime) -> bool:
        """Marks a message acknowledged unless it already is; whether this did."""
        done = await self._s.execute(_ACK, {"m_id": message_id, "at": at})
        return bool(getattr(done, "rowcount", 0))

    async def unack(self, message_id: str) -> None:
        await self._s.execute(_UNACK, {"m_id": message_id})

    async def ack_answered(self, response: MessageRow) -> None:
        """Acknowledges the request that ``response`` answers: the unacknowledged request
        from the response's recipient to its sender with its correlation_id."""
        await self._s.execute(
            _ACK_ANSWERED,
            {
                "responder": response.from_agent,
                "corr": response.correlation_id,
                "requester": response.to_agent,
                "at": response.created_at,
            },
        )

    async def await_response(self, message_id: str, until: datetime | None) -> None:
        """Marks a request as waited for until ``until`` (None: no longer)."""
        await self._s.execute(
            update(MessageRow)
            .where(MessageRow.message_id == message_id)
            .values(awaited_until=until)
        )

    async def expired(self, at: datetime, limit: int) -> list[int]:
        rows = await self._s.execute(
            select(MessageRow.seq).where(MessageRow.expires_at <= at).limit(limit)
        )
        return list(rows.scalars().all())

    async def delete(self, seqs: Collection[int]) -> int:
        result = await self._s.execute(delete(MessageRow).where(MessageRow.seq.in_(list(seqs))))
        return int(getattr(result, "rowcount", 0) or 0)
