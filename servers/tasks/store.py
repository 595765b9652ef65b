"""Repositories of the tasks tables."""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Float, Table, bindparam, delete, func, inspect, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from servers.common.db import InsertOrNothing, stored_chars, within_budget
from servers.common.outbox import write_event

from .models import OutboxRow, TaskRow


class SecondsBetween(FunctionElement[float]):
    """Seconds from the second timestamp to the first, as each database computes them."""

    type = Float()
    name = "seconds_between"
    inherit_cache = True


@compiles(SecondsBetween, "sqlite")
def _seconds_sqlite(element: SecondsBetween, compiler: Any, **kw: Any) -> str:
    # julianday() keeps milliseconds (SQLite's own clock resolution), in days.
    end, start = (compiler.process(arg, **kw) for arg in element.clauses)
    return f"((julianday({end}) - julianday({start})) * 86400.0)"


@compiles(SecondsBetween, "postgresql")
def _seconds_postgresql(element: SecondsBetween, compiler: Any, **kw: Any) -> str:
    end, start = (compiler.process(arg, **kw) for arg in element.clauses)
    return f"EXTRACT(EPOCH FROM ({end} - {start}))"


_tasks = cast(Table, TaskRow.__table__)
ENDED = ("completed", "failed")  # the statuses whose tasks have an end time and a verdict
# (attribute, column) of every mapped column: the attribute of "metadata" is task_metadata.
_TASK_COLUMNS = tuple(
    (attribute.key, attribute.columns[0]) for attribute in inspect(TaskRow).column_attrs
)
_INSERT_TASK = InsertOrNothing(
    _tasks, conflict=["owner_id", "idempotency_key"], returning=_tasks.c.task_id
)


@functools.cache
def _page_query(by_owner: bool, by_status: bool) -> Any:
    """TaskStore.page's statement, built once per filter: a page of tasks, newest first, cut
    after its first task where the characters of its large fields pass the budget. The window
    sums the sizes the database reads, so the rows past the budget are never loaded."""
    where = []
    if by_owner:
        where.append(TaskRow.owner_id == bindparam("owner"))
    if by_status:
        where.append(TaskRow.status.in_(bindparam("statuses", expanding=True)))
    size = stored_chars(TaskRow.description, TaskRow.task_metadata, TaskRow.result)
    window = (
        select(TaskRow.task_id, TaskRow.created_at, size.label("size"))
        .where(*where)
        .order_by(TaskRow.created_at.desc(), TaskRow.task_id.desc())
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
        .subquery()
    )
    kept = within_budget(window, "task_id", (window.c.created_at.desc(), window.c.task_id.desc()))
    return (
        select(TaskRow)
        .where(TaskRow.task_id.in_(kept))
        .order_by(TaskRow.created_at.desc(), TaskRow.task_id.desc())
    )


class TaskStore:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def add(self, task: TaskRow) -> bool:
        """Inserts the task (which stays outside the session); False when the owner's
        idempotency key is taken (a concurrent twin won), in which case nothing was
        written. One INSERT ... ON CONFLICT DO NOTHING, not the ORM's flush in a savepoint:
        every create takes this path."""
        state = inspect(task)
        values = {
            column.key: state.dict[attribute]
            for attribute, column in _TASK_COLUMNS
            if attribute in state.dict
        }
        return await _INSERT_TASK(self._s, values) is not None

    async def get(self, task_id: str, *, lock: bool = False) -> TaskRow | None:
        """The task; ``lock``: locked for this transaction (PostgreSQL; SQLite's writers
        take turns anyway), for a read that the transaction then changes."""
        return await self._s.get(TaskRow, task_id, with_for_update=True if lock else None)

    async def by_idempotency_key(self, owner_id: str, key: str) -> TaskRow | None:
        found = await self._s.execute(
            select(TaskRow).where(TaskRow.owner_id == owner_id, TaskRow.idempotency_key == key)
        )
        return found.scalars().first()

    async def count_open(self, owner_id: str, statuses: Collection[str], cap: int) -> int:
        """How many of the owner's tasks are in these statuses, counted up to ``cap``: the
        count reads at most that many index entries, whatever the owner has."""
        some = (
            select(TaskRow.task_id)
            .where(TaskRow.owner_id == owner_id, TaskRow.status.in_(list(statuses)))
            .limit(cap)
            .subquery()
        )
        return int(await self._s.scalar(select(func.count()).select_from(some)) or 0)

    def _visible(self, owner_id: str | None, statuses: Collection[str]) -> list[Any]:
        where: list[Any] = []
        if owner_id is not None:
            where.append(TaskRow.owner_id == owner_id)
        if statuses:
            where.append(TaskRow.status.in_(list(statuses)))
        return where

    async def page(
        self,
        *,
        owner_id: str | None,
        statuses: Collection[str],
        limit: int,
        offset: int,
        budget: int,
    ) -> tuple[Sequence[TaskRow], int]:
        """A page of tasks, newest first, and the number that match. The page ends early, after
        its first task, where its large fields (description, metadata, result, as the database
        stores them) pass ``budget`` characters: its rows are never read whole beyond that."""
        where = self._visible(owner_id, statuses)
        total = (
            await self._s.execute(select(func.count()).select_from(TaskRow).where(*where))
        ).scalar_one()
        query = _page_query(owner_id is not None, bool(statuses))
        params: dict[str, Any] = {"limit": limit, "offset": offset, "budget": budget}
        if owner_id is not None:
            params["owner"] = owner_id
        if statuses:
            params["statuses"] = list(statuses)
        rows = await self._s.execute(query, params)
        return rows.scalars().all(), int(total)

    async def count_by_status(self, owner_id: str | None) -> dict[str, int]:
        rows = await self._s.execute(
            select(TaskRow.status, func.count())
            .where(*self._visible(owner_id, ()))
            .group_by(TaskRow.status)
        )
        return {status: int(count) for status, count in rows.all()}

    def _ran(self, owner_id: str | None) -> list[Any]:
        return [
            *self._visible(owner_id, ("completed",)),
            TaskRow.started_at.is_not(None),
            TaskRow.completed_at.is_not(None),
        ]

    async def average_seconds(self, owner_id: str | None) -> float:
        """How long the completed tasks ran on average, from start to end (0 for none),
        computed by the database: the stats cover every completed task the caller has."""
        query = select(func.avg(SecondsBetween(TaskRow.completed_at, TaskRow.started_at)))
        average = (await self._s.execute(query.where(*self._ran(owner_id)))).scalar_one()
        return float(average or 0.0)

    async def completion_seconds(self, *, since: datetime, limit: int) -> list[float]:
        """How long each of the latest ``limit`` tasks completed since ``since`` ran, from
        start to end (the metrics' sample, for a percentile)."""
        query = (
            select(TaskRow.started_at, TaskRow.completed_at)
            .where(*self._ran(None), TaskRow.completed_at >= since)
            .order_by(TaskRow.completed_at.desc())
            .limit(limit)
        )
        rows = await self._s.execute(query)
        return [(end - start).total_seconds() for start, end in rows.all() if start and end]

    async def ended_before(
        self, statuses: Collection[str], before: datetime, limit: int
    ) -> list[str]:
        """Ids of up to ``limit`` tasks in these (ended) statuses last changed before
        ``before``."""
        rows = await self._s.execute(
            select(TaskRow.task_id)
            .where(TaskRow.status.in_(list(statuses)), TaskRow.updated_at < before)
            .limit(limit)
        )
        return list(rows.scalars())

    async def delete(self, task_ids: Collection[str]) -> int:
        found = await self._s.execute(delete(TaskRow).where(TaskRow.task_id.in_(list(task_ids))))
        return int(getattr(found, "rowcount", 0) or 0)

    async def by_agent(self, agent_ids: Collection[str]) -> dict[str, tuple[int, int, float]]:
        """For each of these agents that ran the last attempt of ended tasks: (completed,
        failed, mean seconds of the completed ones from start to end)."""
        rows = await self._s.execute(
            select(
                TaskRow.assigned_agent,
                TaskRow.status,
                func.count(),
                func.avg(SecondsBetween(TaskRow.completed_at, TaskRow.started_at)),
            )
            .where(TaskRow.assigned_agent.in_(list(agent_ids)), TaskRow.status.in_(ENDED))
            .group_by(TaskRow.assigned_agent, TaskRow.status)
        )
        figures: dict[str, tuple[int, int, float]] = {}
        for agent_id, status, count, seconds in rows.all():
            completed, failed, average = figures.get(agent_id, (0, 0, 0.0))
            if status == "completed":
                completed, average = int(count), float(seconds or 0.0)
            else:
                failed = int(count)
            figures[agent_id] = (completed, failed, average)
        return figures

    async def ended_since(self, since: datetime) -> dict[str, int]:
        """How many tasks completed and how many failed since ``since``."""
        rows = await self._s.execute(
            select(TaskRow.status, func.count())
            .where(TaskRow.status.in_(ENDED), TaskRow.completed_at >= since)
            .group_by(TaskRow.status)
        )
        return {status: int(count) for status, count in rows.all()}


class Outbox:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    def add(self, event_type: str, task: TaskRow, at: datetime, **data: Any) -> None:
        write_event(
            self._s,
            OutboxRow,
            event_type=event_type,
            subject_id=task.task_id,
            owner_id=task.owner_id,
            # "callback": whether the callback worker has a URL to call for this task, so
            # that it reads the task only when it does.
            data={
                "task_id": task.task_id,
                "status": task.status,
                "callback": bool(task.callback_url),
                **data,
            },
            at=at,
        )
