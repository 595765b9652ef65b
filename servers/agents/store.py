"""Repositories of the agents tables."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer

from servers.common.db import stored_chars
from servers.common.outbox import write_event

from .models import AgentRow, OutboxRow


class AgentStore:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def get(self, agent_id: str, *, lock: bool = False) -> AgentRow | None:
        """The agent's row; ``lock`` holds it FOR UPDATE until the transaction ends (on
        PostgreSQL; SQLite's writers are serialised by BEGIN IMMEDIATE already)."""
        query = select(AgentRow).where(AgentRow.agent_id == agent_id)
        if lock:
            query = query.with_for_update()
        return (await self._s.execute(query)).scalars().first()

    async def add(self, row: AgentRow) -> bool:
        """Inserts the row; False when a concurrent first connection inserted it first."""
        try:
            async with self._s.begin_nested():
                self._s.add(row)
                await self._s.flush()
        except IntegrityError:
            return False
        return True

    async def visible(self, owner_id: str | None, *, configured: bool = True) -> Sequence[AgentRow]:
        """Every agent of an owner, or every agent (None: an admin asks); ``configured``:
        False leaves the configuration columns unread (touching them then fails)."""
        query = select(AgentRow).order_by(AgentRow.name, AgentRow.agent_id)
        if not configured:
            query = query.options(defer(AgentRow.configuration), defer(AgentRow.overrides))
        if owner_id is not None:
            query = query.where(AgentRow.owner_id == owner_id)
        return (await self._s.execute(query)).scalars().all()

    async def counts(self, heard_since: datetime) -> tuple[int, int]:
        """(registered, online): every agent, and those marked online that were heard from
        since ``heard_since``."""
        online = and_(AgentRow.online.is_(True), AgentRow.last_seen_at >= heard_since)
        found = await self._s.execute(select(func.count(), func.count().filter(online)))
        registered, fresh = found.one()
        return int(registered), int(fresh)

    async def resolve(self, agent_ids: Sequence[str], key_id: str) -> Sequence[AgentRow]:
        query = select(AgentRow)
        if agent_ids:
            query = query.where(AgentRow.agent_id.in_(list(agent_ids)))
        if key_id:
            query = query.where(AgentRow.key_id == key_id)
        return (await self._s.execute(query)).scalars().all()

    async def touch(self, seen: Sequence[dict[str, Any]]) -> None:
        """Records when each connected agent was last heard from and its load, one batch;
        a row another stream has taken over since (``session_id``) is left alone. Each item:
        agent_id, session_id, last_seen_at, current_load."""
        table = AgentRow.metadata.tables[AgentRow.__tablename__]
        statement = (
            update(table)
            .where(
                table.c.agent_id == bindparam("b_agent_id"),
                table.c.session_id == bindparam("b_session_id"),
                table.c.online.is_(True),
            )
            .values(last_seen_at=bindparam("b_last_seen_at"), current_load=bindparam("b_load"))
        )
        await self._s.execute(
            statement,
            [
                {
                    "b_agent_id": item["agent_id"],
                    "b_session_id": item["session_id"],
                    "b_last_seen_at": item["last_seen_at"],
                    "b_load": item["current_load"],
                }
                for item in seen
            ],
        )

    async def configuration_sizes(self, agent_ids: Sequence[str]) -> dict[str, int]:
        """The characters of these agents' stored configuration and overrides, by id, read
        without reading them."""
        if not agent_ids:
            return {}
        size = stored_chars(AgentRow.configuration, AgentRow.overrides)
        found = await self._s.execute(
            select(AgentRow.agent_id, size).where(AgentRow.agent_id.in_(list(agent_ids)))
        )
        return {agent_id: int(chars or 0) for agent_id, chars in found.all()}

    async def configurations(
        self, agent_ids: Sequence[str]
    ) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
        """The stored configuration and overrides of these agents, by id."""
        if not agent_ids:
            return {}
        found = await self._s.execute(
            select(AgentRow.agent_id, AgentRow.configuration, AgentRow.overrides).where(
                AgentRow.agent_id.in_(list(agent_ids))
            )
        )
        return {agent_id: (config, overrides) for agent_id, config, overrides in found.all()}

    async def owned(self, owner_id: str) -> int:
        """How many agents the owner has registered."""
        query = select(func.count()).select_from(AgentRow).where(AgentRow.owner_id == owner_id)
        return int((await self._s.execute(query)).scalar_one())

    async def forget(self, before: datetime, limit: int) -> list[str]:
        """Deletes up to ``limit`` agents offline and last heard from before ``before``; their
        ids. One that connects again meanwhile is online, and stays."""
        offline = (AgentRow.online.is_(False), AgentRow.last_seen_at < before)
        found = await self._s.execute(select(AgentRow.agent_id).where(*offline).limit(limit))
        ids = list(found.scalars().all())
        if ids:
            await self._s.execute(delete(AgentRow).where(AgentRow.agent_id.in_(ids), *offline))
        return ids

    async def stale(self, before: datetime, *, lock: bool) -> Sequence[AgentRow]:
        """Rows still marked online that nobody touched since ``before``. ``lock`` takes them
        FOR UPDATE SKIP LOCKED, so that replicas reaping together do not both take one."""
        query = (
            select(AgentRow)
            .where(AgentRow.online.is_(True), AgentRow.last_seen_at < before)
            .order_by(AgentRow.last_seen_at)
            .limit(500)
        )
        if lock:
            query = query.with_for_update(skip_locked=True)
        return (await self._s.execute(query)).scalars().all()


class Outbox:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    def add(
        self, event_type: str, *, agent_id: str, owner_id: str, at: datetime, **data: Any
    ) -> None:
        write_event(
            self._s,
            OutboxRow,
            event_type=event_type,
            subject_id=agent_id,
            owner_id=owner_id,
            data={"agent_id": agent_id, **data},
            at=at,
        )
