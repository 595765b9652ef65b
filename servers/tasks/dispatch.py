"""Assignments as leases. The agents service claims queued tasks for connected agents; each
attempt gets a fencing token and a lease that heartbeats and progress reports renew. A lease that
runs out puts the task back in the queue with its attempt count raised, or fails it after the
last attempt; reports carrying an older attempt's token are refused, so a late result of an agent
that lost its lease never overwrites the current attempt.
"""

from __future__ import annotations

import json
import typing
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, Table, Text, bindparam, cast, func, or_, select, update

from servers.common.clock import aware, now
from servers.common.db import Database
from servers.common.protos import NESTING_MAX, json_size, too_deep

from .models import TaskRow
from .store import Outbox, SecondsBetween, TaskStore

HELD = ("assigned", "running")
CLAIM_SCAN = 200  # queued tasks a claim looks at, at most, for one its agent can do
CLAIM_PAGE = 20
HELD_MAX = 1000  # an agent's largest capacity: the most tasks it can hold
NO_REQUIREMENTS = "[]"  # required_capabilities, as stored, of a task that requires none
# The largest result kept, as compact JSON: what fits the 1 MiB body Envoy takes from a REST
# agent. A larger one (a Connect stream takes 4 MiB frames) fails the task: it would make every
# read of the task, its events and its callback that large.
RESULT_MAX_BYTES = 1 << 20


# Built once, with bound parameters, on the table (not the mapped class): every claim runs them,
# and plain Core statements skip the ORM's compiling and loading.
_t = typing.cast(Table, TaskRow.__table__)
# The queue in claim order. Requirements come as stored JSON text: most tasks have none, and
# parsing a page of them for each claim costs more than the query.
_QUEUE = (
    select(_t.c.task_id, _t.c.type, cast(_t.c.required_capabilities, Text))
    .where(
        _t.c.status == "queued",
        or_(
            _t.c.type.in_(bindparam("types", expanding=True)),
            cast(_t.c.required_capabilities, Text) != NO_REQUIREMENTS,
        ),
    )
    .order_by(_t.c.priority.desc(), _t.c.created_at, _t.c.task_id)
    .limit(CLAIM_PAGE)
    .offset(bindparam("offset"))
)
_QUEUE_LOCKED = _QUEUE.with_for_update(skip_locked=True)
# Leasing is one statement: the task changes only if it is still queued (on PostgreSQL the
# UPDATE locks the row, and a concurrent claim's commit makes the condition false), and the
# row comes back whole for the assignment and its event.
_FIELDS = tuple((prop.key, prop.columns[0]) for prop in TaskRow.__mapper__.column_attrs)
_LEASE = (
    update(_t)
    .where(_t.c.task_id == bindparam("lease_task"), _t.c.status == "queued")
    .values(
        status="assigned",
        assigned_agent=bindparam("lease_agent"),
        attempt=_t.c.attempt + 1,
        attempt_token=bindparam("lease_token"),
        lease_expires_at=bindparam("lease_until"),
        leased_at=bindparam("lease_at"),
        updated_at=bindparam("lease_at"),
    )
    .returning(*(column for _, column in _FIELDS))
)

# A result of the attempt holding the task, the usual outcome, is one statement too; anything
# else (an error, a repeat, a refusal) goes through the mapped row (``_record``). A task its
# agent never reported running ran from its lease: while a task is `assigned`, its updated_at
# is the moment it was leased (renewals move only lease_expires_at).
_AT = bindparam("done_at", type_=_t.c.updated_at.type)
_COMPLETE = (
    update(_t)
    .where(
        _t.c.task_id == bindparam("done_task"),
        _t.c.assigned_agent == bindparam("done_agent"),
        _t.c.attempt_token == bindparam("done_token"),
        _t.c.status.in_(HELD),
    )
    .values(
        status="completed",
        result=bindparam("done_result", type_=_t.c.result.type),
        progress=100,
        completed_at=_AT,
        started_at=func.coalesce(_t.c.started_at, _t.c.updated_at),
        lease_expires_at=None,
        updated_at=_AT,
        # An earlier attempt's error does not describe a task that completed.
        error="",
        error_code="",
    )
    .returning(*(column for _, column in _FIELDS))
)

# The held tasks whose current attempt has run past its time limit, computed by the database so
# that the sweep reads only those (the status index narrows it to held tasks first).
_OVERDUE = (
    select(TaskRow)
    .where(
        TaskRow.status.in_(HELD),
        TaskRow.timeout_seconds > 0,
        TaskRow.leased_at.is_not(None),
        SecondsBetween(bindparam("overdue_at", type_=DateTime(timezone=True)), TaskRow.leased_at)
        >= TaskRow.timeout_seconds,
    )
    .order_by(TaskRow.task_id)
    .limit(500)
    # As the lease sweep: a task whose outcome is being recorded is left to that transaction.
    .with_for_update(skip_locked=True)
)


def _past_limit(task: TaskRow, at: datetime) -> bool:
    """Whether the current attempt has run out of time, read again on the locked row."""
    if task.leased_at is None or task.timeout_seconds <= 0 or task.status not in HELD:
        return False
    return aware(task.leased_at) + timedelta(seconds=task.timeout_seconds) <= at


def _holds(task: TaskRow, agent_id: str, token: str) -> bool:
    """Whether this attempt (agent and fencing token) holds the task."""
    return task.status in HELD and task.assigned_agent == agent_id and task.attempt_token == token


_KEYS = tuple(key for key, _ in _FIELDS)
_new_task = TaskRow.__mapper__.class_manager.new_instance


def _detached(row: Any) -> TaskRow:
    """A task from a row of _FIELDS, outside any session (its statement already wrote it).

    Its values are loaded as a query loads a row, straight into the instance's dict: the
    constructor would set each of its 27 attributes through the instrumentation and record
    each as a change to flush, a twentieth of the tasks server's time in the dispatch
    benchmark, for an object that is only read."""
    task = _new_task()
    task.__dict__.update(zip(_KEYS, row, strict=True))
    return task


@dataclass(frozen=True)
class Outcome:
    accepted: bool
    status: str
    reason: str = ""
    task: TaskRow | None = None  # as recorded, when accepted
    next: TaskRow | None = None  # leased to the agent with it, when asked (complete's claim)
    fresh: bool = False  # this call recorded it (not a repeat of the recorded outcome)


@dataclass(frozen=True)
class Lost:
    """An attempt the mesh ended (its lease ran out, its agent stopped, it ran out of time):
    the task and the agent that held it."""

    task_id: str
    agent_id: str
    requeued: bool
    attempt_token: str = ""  # the attempt that ended
    reason: str = "LEASE_LOST"  # the Cancellation's reason, for its holder


def _unkeepable(result: dict[str, Any]) -> tuple[str, str, bool] | None:
    """A result too large or too deeply nested to keep, as the attempt's error. Not
    retryable: another attempt of the same work would produce the same result."""
    if too_deep(result):
        message = f"the result nests deeper than {NESTING_MAX} levels of objects and arrays"
        return "RESULT_TOO_DEEP", message, False
    size = json_size(result)
    if size <= RESULT_MAX_BYTES:
        return None
    message = f"the result is {size} bytes of JSON; at most {RESULT_MAX_BYTES} are kept"
    return "RESULT_TOO_LARGE", message, False


class Dispatch:
    def __init__(self, *, db: Database, lease_seconds: float) -> None:
        self._db = db
        self.lease = timedelta(seconds=lease_seconds)
        # No lease runs out before one whole lease after this server started: while the mesh
        # was down no agent could renew one, and those that finished their work meanwhile need
        # the time to reconnect and report it (else a restart after an outage longer than a
        # lease threw their results away, or failed the task on its last attempt).
        self._grace_until = now() + self.lease

    async def get(self, task_id: str) -> TaskRow:
        async with self._db.session() as s:
            task = await s.get(TaskRow, task_id)
        if task is None:
            raise LookupError(task_id)
        return task

    async def claim(self, agent_id: str, capabilities: Sequence[str]) -> TaskRow | None:
        """The most urgent queued task the agent can do (first in, first out within a
        priority), now leased to it; None when there is none.

        The queue is read first without the write lock: an agent with room asks after every
        task it finishes, and when nothing is queued for it the answer costs no write
        transaction. A task another claim took in between is chosen again under the lock."""
        caps = frozenset(capabilities)
        if not caps:
            return None
        async with self._db.session() as s:
            seen = await self._choose(s, caps, lock=False)
        if seen is None:
            return None
        async with self._db.write() as s, s.begin():
            return await self._lease_next(s, agent_id, caps, now(), seen=seen)

    async def _lease_next(
        self, s: Any, agent_id: str, caps: frozenset[str], at: datetime, *, seen: str = ""
    ) -> TaskRow | None:
        """Inside a write transaction: leases the first queued task these capabilities cover
        (``seen``, read before the lock, if it is still queued) to the agent. The task comes
        back detached from the session: the UPDATE already wrote it."""
        task = await self._lease(s, seen, agent_id, at) if seen else None
        if task is None:
            chosen = await self._choose(s, caps)
            task = None if chosen is None else await self._lease(s, chosen, agent_id, at)
        if task is not None:
            Outbox(s).add("task.assigned", task, at, agent_id=agent_id, attempt=task.attempt)
        return task

    async def _lease(self, s: Any, task_id: str, agent_id: str, at: datetime) -> TaskRow | None:
        """Leases the task to the agent if it is still queued."""
        found = await s.execute(
            _LEASE,
            {
                "lease_task": task_id,
                "lease_agent": agent_id,
                "lease_token": str(uuid.uuid4()),
                "lease_until": at + self.lease,
                "lease_at": at,
            },
        )
        row = found.first()
        return None if row is None else _detached(row)

    async def _choose(self, s: Any, caps: frozenset[str], *, lock: bool = True) -> str | None:
        """The id of the first queued task, in queue order, that these capabilities cover.

        An agent qualifies when it has every required capability, or, when none is required,
        the task's type. The database rules out the tasks of other types that require nothing
        (the common case), reading the queue index in order; tasks with requirements are
        checked here, a page at a time, on a few columns. ``lock``: on PostgreSQL, lock the
        rows read (replicas claim side by side, skipping each other's); SQLite's writers
        queue on BEGIN IMMEDIATE instead."""
        if not caps:
            return None
        query = _QUEUE_LOCKED if lock and not self._db.is_sqlite else _QUEUE
        types = sorted(caps)
        for offset in range(0, CLAIM_SCAN, CLAIM_PAGE):
            rows = (await s.execute(query, {"types": types, "offset": offset})).all()
            for task_id, task_type, required in rows:
                if required == NO_REQUIREMENTS:
                    if task_type in caps:
                        return str(task_id)
                elif set(json.loads(required)) <= caps:
                    return str(task_id)
            if len(rows) < CLAIM_PAGE:
                break
        return None

    async def _held(self, s: Any, task_id: str, agent_id: str, token: str) -> TaskRow | None:
        """The task, locked for this transaction, if this attempt holds it."""
        task = await s.get(TaskRow, task_id, with_for_update=True)
        return task if task is not None and _holds(task, agent_id, token) else None

    async def figures(self, agent_ids: Sequence[str]) -> dict[str, tuple[int, int, float]]:
        """What each agent finished (TaskStore.by_agent)."""
        async with self._db.session() as s:
            return await TaskStore(s).by_agent(agent_ids)

    async def held_by(self, agent_id: str, limit: int = HELD_MAX) -> list[TaskRow]:
        """The tasks the agent holds now, oldest lease first."""
        async with self._db.session() as s:
            rows = await s.execute(
                select(TaskRow)
                .where(TaskRow.status.in_(HELD), TaskRow.assigned_agent == agent_id)
                .order_by(TaskRow.leased_at, TaskRow.task_id)
                .limit(limit)
            )
            return list(rows.scalars())

    async def renew(self, agent_id: str, task_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Extends the leases the agent still holds; returns (renewed, lost) task ids."""
        at = now()
        renewed: list[str] = []
        async with self._db.write() as s, s.begin():
            if task_ids:
                rows = await s.execute(
                    select(TaskRow)
                    .where(
                        TaskRow.task_id.in_(list(task_ids)),
                        TaskRow.assigned_agent == agent_id,
                        TaskRow.status.in_(HELD),
                    )
                    # Rows locked in one order everywhere, so that two such transactions
                    # (a heartbeat and a release of the same agent) wait, never deadlock.
                    .order_by(TaskRow.task_id)
                    .with_for_update()
                )
                for task in rows.scalars():
                    task.lease_expires_at = at + self.lease
                    renewed.append(task.task_id)
        return renewed, [t for t in task_ids if t not in renewed]

    async def progress(
        self, task_id: str, agent_id: str, token: str, progress: int, message: str
    ) -> TaskRow | str:
        """Records progress and renews the lease. When the attempt is no longer current, the
        task's status instead ("" when there is no such task), for the refusal to name."""
        at = now()
        async with self._db.write() as s, s.begin():
            task = await s.get(TaskRow, task_id, with_for_update=True)
            if task is None or not _holds(task, agent_id, token):
                return "" if task is None else task.status
            if task.status == "assigned":
                task.status = "running"
                task.started_at = at
                Outbox(s).add("task.started", task, at, agent_id=agent_id, attempt=task.attempt)
            task.progress = max(0, min(100, progress))
            task.lease_expires_at = at + self.lease
            task.updated_at = at
            Outbox(s).add("task.progress", task, at, progress=task.progress, message=message[:500])
            return task

    async def complete(
        self,
        task_id: str,
        agent_id: str,
        token: str,
        *,
        result: dict[str, Any] | None,
        error: tuple[str, str, bool] | None,
        claim_next: Sequence[str] | None = None,
    ) -> Outcome:
        """Records an attempt's outcome. A repeat of the recorded outcome is accepted again; an
        outcome of an attempt that is no longer current is refused. ``claim_next``: the agent's
        capabilities, to lease it its next task in the same transaction once the outcome is
        accepted (``Outcome.next``)."""
        if result is not None and error is None:
            error = _unkeepable(result)
            result = None if error else result
        at = now()
        async with self._db.write() as s, s.begin():
            done = (
                None
                if error is not None
                else await self._complete(s, task_id, agent_id, token, at, result)
            )
            if done is not None:
                Outbox(s).add("task.completed", done, at, agent_id=agent_id, attempt=done.attempt)
                outcome = Outcome(True, done.status, task=done, fresh=True)
            else:
                outcome = await self._record(s, task_id, agent_id, token, at, result, error)
            # Only an attempt ended by this call frees a slot: a repeat's slot was refilled by
            # the first call, and a task queued again for a retryable error is not handed
            # straight back to the agent that failed it (which may be stopping).
            if claim_next and outcome.fresh and outcome.status in ("completed", "failed"):
                following = await self._lease_next(s, agent_id, frozenset(claim_next), at)
                outcome = replace(outcome, next=following)
            return outcome

    async def _complete(
        self,
        s: Any,
        task_id: str,
        agent_id: str,
        token: str,
        at: datetime,
        result: dict[str, Any] | None,
    ) -> TaskRow | None:
        """Completes the task if this attempt holds it; the task, detached, or None."""
        found = await s.execute(
            _COMPLETE,
            {
                "done_task": task_id,
                "done_agent": agent_id,
                "done_token": token,
                "done_result": result or {},
                "done_at": at,
            },
        )
        row = found.first()
        return None if row is None else _detached(row)

    async def _record(
        self,
        s: Any,
        task_id: str,
        agent_id: str,
        token: str,
        at: datetime,
        result: dict[str, Any] | None,
        error: tuple[str, str, bool] | None,
    ) -> Outcome:
        """An outcome through the mapped row: errors (a retry or a failure), repeats of the
        recorded outcome, refusals. A result reaches the completing branch only if the row
        changed between ``_complete``'s statement and this read, and is judged afresh. A task
        the mesh failed (its last lease ran out, its agent stopped) has no attempt token left,
        so a late result of that attempt is refused, not taken for a repeat."""
        task = await s.get(TaskRow, task_id, with_for_update=True)
        if task is None:
            return Outcome(False, "", "TASK_NOT_FOUND")
        if task.attempt_token == token and task.status in ("completed", "failed"):
            return Outcome(True, task.status, task=task)
        if (
            error is not None
            and task.status == "queued"
            and task.attempt_token == token
            and (task.error_code, task.error) == (error[0][:64], error[1][:2000])
        ):
            # A repeat of this attempt's retryable error, which queued the task again (its
            # answer was lost): the same answer, until another attempt takes the task.
            return Outcome(True, task.status, task=task)
        if not _holds(task, agent_id, token):
            return Outcome(False, task.status, "CONFLICT")
        leased_at = task.updated_at  # see _COMPLETE
        task.lease_expires_at = None
        task.updated_at = at
        if error is None:
            task.status = "completed"
            task.result = result or {}
            task.progress = 100
            task.completed_at = at
            task.started_at = task.started_at or leased_at
            task.error = task.error_code = ""
            Outbox(s).add("task.completed", task, at, agent_id=agent_id, attempt=task.attempt)
            return Outcome(True, task.status, task=task, fresh=True)
        code, message, retryable = error
        task.error, task.error_code = message[:2000], code[:64]
        if retryable and task.attempt < task.max_attempts:
            self._requeue(task)
            Outbox(s).add("task.requeued", task, at, reason=code, attempt=task.attempt)
        else:
            task.status = "failed"
            task.completed_at = at
            Outbox(s).add("task.failed", task, at, error_code=task.error_code, attempt=task.attempt)
        return Outcome(True, task.status, task=task, fresh=True)

    @staticmethod
    def _requeue(task: TaskRow) -> None:
        """Back in the queue: of the attempt that ended only its error, its count and its token
        stay (a repeat of its outcome is matched against the token), so that the next attempt
        starts as the first did."""
        task.status = "queued"
        task.assigned_agent = ""
        task.lease_expires_at = None
        task.leased_at = None
        task.started_at = None
        task.progress = 0

    async def expire_leases(self) -> list[Lost]:
        """Requeues (or, after the last attempt, fails) every task whose lease ran out, and
        fails every task whose attempt ran past its time limit (``TASK_TIMEOUT``)."""
        at = now()
        async with self._db.write() as s, s.begin():
            overdue = (await s.execute(_OVERDUE, {"overdue_at": at})).scalars().all()
            timed_out = [self._time_out(s, t, at) for t in overdue if _past_limit(t, at)]
            if at < self._grace_until:
                return timed_out
            rows = await s.execute(
                select(TaskRow)
                .where(TaskRow.status.in_(HELD), TaskRow.lease_expires_at < at)
                .limit(500)
                # PostgreSQL: a task whose result or progress is being recorded right now is
                # left to that transaction (and to the next sweep if it still expired); rows
                # read without the lock would be overwritten, outcome and all.
                .with_for_update(skip_locked=True)
            )
            expired = [
                t
                for t in rows.scalars()
                if t.lease_expires_at is not None and aware(t.lease_expires_at) < at
            ]
            return timed_out + [
                self._give_up(s, t, at, "LEASE_EXPIRED", "lease expired") for t in expired
            ]

    def _time_out(self, s: Any, task: TaskRow, at: datetime) -> Lost:
        """Fails a task whose attempt ran past its time limit. Not retried: another attempt
        of the same work would run as long."""
        holder, token = task.assigned_agent, task.attempt_token or ""
        task.error = (
            f"ran past its time limit of {task.timeout_seconds} s on attempt {task.attempt} "
            f"(agent {holder})"
        )
        task.error_code = "TASK_TIMEOUT"
        self._fail(s, task, at)
        return Lost(task.task_id, holder, False, token, reason="TASK_TIMEOUT")

    def _fail(self, s: Any, task: TaskRow, at: datetime) -> None:
        """Fails the task for good, as the mesh's verdict on its current attempt."""
        task.status = "failed"
        task.lease_expires_at = None
        task.completed_at = at
        task.updated_at = at
        # No attempt holds it any more: a late result is refused, not taken for a repeat.
        task.attempt_token = None
        Outbox(s).add("task.failed", task, at, error_code=task.error_code, attempt=task.attempt)

    async def release(self, agent_id: str, reason: str) -> list[Lost]:
        """Takes back every task an agent holds (it stopped cleanly), as if their leases had
        run out, without waiting for them to."""
        at = now()
        async with self._db.write() as s, s.begin():
            rows = await s.execute(
                select(TaskRow)
                .where(TaskRow.status.in_(HELD), TaskRow.assigned_agent == agent_id)
                .order_by(TaskRow.task_id)
                .with_for_update()
            )
            return [self._give_up(s, t, at, reason, "agent stopped") for t in rows.scalars()]

    async def give_back(self, task_id: str, agent_id: str, token: str) -> TaskRow | None:
        """Queues a task again whose assignment never reached its agent, as if this attempt
        had not been made: the attempt count goes back and the token is dropped (a report
        carrying it is refused). Only while that attempt holds the task and the agent has not
        reported on it; the task, or None when nothing changed."""
        at = now()
        async with self._db.write() as s, s.begin():
            task = await self._held(s, task_id, agent_id, token)
            if task is None or task.status != "assigned":
                return None
            self._requeue(task)
            task.attempt = max(0, task.attempt - 1)
            task.attempt_token = None
            task.updated_at = at
            Outbox(s).add("task.requeued", task, at, reason="NOT_DELIVERED", attempt=task.attempt)
            return task

    def _give_up(self, s: Any, task: TaskRow, at: datetime, code: str, why: str) -> Lost:
        """Ends an attempt that its agent will not finish: another one, or the task fails."""
        holder, token = task.assigned_agent, task.attempt_token or ""
        task.updated_at = at
        task.error = f"{why} on attempt {task.attempt} (agent {holder})"
        task.error_code = code
        if task.attempt < task.max_attempts:
            self._requeue(task)
            Outbox(s).add("task.requeued", task, at, reason=code, attempt=task.attempt)
        else:
            self._fail(s, task, at)
        return Lost(task.task_id, holder, task.status == "queued", token)
