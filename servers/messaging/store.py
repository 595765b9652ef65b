"""Repositories of the messaging tables."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from .models import MessageRow

Position = tuple[datetime, int]  # (created_at, seq): a place in an inbox, oldest first


class MessageStore:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def add(self, row: MessageRow) -> bool:
        """Inserts the message; False when its message_id is taken (a concurrent twin won),
        in which case nothing was written."""
        try:
            async with self._s.begin_nested():
                self._s.add(row)
                await self._s.flush()
        except IntegrityError:
            return False
        return True

    async def get(self, message_id: str) -> MessageRow | None:
        found = await self._s.execute(select(MessageRow).where(MessageRow.message_id == message_id))
        return found.scalars().first()

    async def unacked_count(self, agent_id: str, at: datetime) -> int:
        total = await self._s.execute(
            select(func.count())
            .select_from(MessageRow)
            .where(
                MessageRow.to_agent == agent_id,
                MessageRow.acked_at.is_(None),
                MessageRow.expires_at > at,
            )
        )
        return int(total.scalar_one())

    async def page(
        self, agent_id: str, *, unacked: bool, at: datetime, limit: int, offset: int
    ) -> tuple[Sequence[MessageRow], int]:
        where: list[Any] = [MessageRow.to_agent == agent_id, MessageRow.expires_at > at]
        if unacked:
            where.append(MessageRow.acked_at.is_(None))
        total = (
            await self._s.execute(select(func.count()).select_from(MessageRow).where(*where))
        ).scalar_one()
        rows = await self._s.execute(
            select(MessageRow)
            .where(*where)
            .order_by(MessageRow.created_at, MessageRow.seq)
            .limit(limit)
            .offset(offset)
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
    ) -> Sequence[MessageRow]:
        """What an inbox stream sends: unacknowledged, unexpired messages created at or after
        ``since``, oldest first, after ``after``. Responses that a SendRequest of the
        recipient is waiting for are left to that waiter."""
        request = aliased(MessageRow)
        awaited = exists().where(
            request.from_agent == MessageRow.to_agent,
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
        self, agent_id: str, correlation_id: str, *, since: datetime, at: datetime
    ) -> MessageRow | None:
        """The first unexpired response to ``agent_id`` carrying ``correlation_id``, written
        at or after ``since`` (the request's own time)."""
        found = await self._s.execute(
            select(MessageRow)
            .where(
                MessageRow.to_agent == agent_id,
                MessageRow.correlation_id == correlation_id,
                MessageRow.type == "response",
                MessageRow.created_at >= since,
                MessageRow.expires_at > at,
            )
            .order_by(MessageRow.created_at, MessageRow.seq)
            .limit(1)
        )
        return found.scalars().first()

    async def ack(self, message_id: str, at: datetime) -> None:
        """Marks a message acknowledged unless it already is."""
        await self._s.execute(
            update(MessageRow)
            .where(MessageRow.message_id == message_id, MessageRow.acked_at.is_(None))
            .values(acked_at=at)
        )

    async def await_response(self, message_id: str, until: datetime) -> None:
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
