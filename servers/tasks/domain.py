"""The rules of tasks: what may be created, who sees what, which state may follow which.

A task moves `created -> queued -> assigned -> running` and ends `completed`, `failed`, `stopped`
or `cancelled`. This service is the only writer of that state, and every change writes its event
to the outbox in the same transaction. Assignment to agents (leases, attempts, outcomes) is
dispatch.py's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from servers.common.clock import aware, now
from servers.common.config import TASK_TIMEOUT_DEFAULT, TASK_TIMEOUT_MAX
from servers.common.context import Principal, add_cost
from servers.common.db import Database
from servers.common.errors import AlreadyExists, Conflict, NotFound, RateLimited, ValidationError
from servers.common.pagination import PAGE_MAX_BYTES, Page
from servers.common.protos import NESTING_MAX, json_size, too_deep
from servers.common.text import TYPE_NAME, invisible

from .callbacks import url_problem
from .models import TaskRow
from .store import Outbox, TaskStore

log = logging.getLogger("agentmesh.tasks")

STATUSES = (
    "created",
    "queued",
    "assigned",
    "running",
    "completed",
    "failed",
    "stopped",
    "cancelled",
)
TERMINAL = frozenset({"completed", "failed", "stopped", "cancelled"})
# Not ended: what a user may hold at most AGENTMESH_OPEN_TASKS_PER_USER of.
OPEN = ("created", "queued", "assigned", "running")
OPEN_PER_USER = 10_000
# Counting a user's unfinished tasks reads as many index entries as it has: at every create,
# a backlog of 1,500 cost the dispatch benchmark 15% of its throughput. A count is therefore
# remembered for OPEN_RECOUNT_SECONDS and raised by each create since (an upper bound: ended
# tasks only lower the truth), and taken afresh at every create once it is within
# OPEN_NEAR of the limit. Counts of at most OPEN_REMEMBERED users are kept.
OPEN_RECOUNT_SECONDS = 1.0
OPEN_NEAR = 0.9
OPEN_REMEMBERED = 10_000
# The stats' "active": on its way to an agent or with one (a `created` task waits for StartTask).
ACTIVE = frozenset({"queued", "assigned", "running"})
# Seed 004's older words, accepted as list filters.
STATUS_ALIASES = {"pending": ("created", "queued"), "processing": ("assigned", "running")}
# Seed 001's priority words and the seed 004 numbers they stand for (and back).
PRIORITY_WORDS = {"low": 2, "medium": 5, "high": 8, "critical": 10}
DEFAULT_PRIORITY, DEFAULT_ATTEMPTS, MAX_ATTEMPTS = 5, 3, 10
LIMITS = {
    "title": 200,
    "description": 100_000,
    "model": 100,
    "idempotency_key": 128,
    "callback_url": 2048,
}
# One-line labels shown in lists, refused with an invisible character (servers/common/text.py);
# the description is free text.
LABELS = ("title", "model")
METADATA_MAX_BYTES = 64 * 1024
STOP_REASON_MAX = 500  # characters of the reason a stopper gives (StopTaskRequest.reason)
MAX_CAPABILITIES = 32


# The stats read every task of the caller (of the mesh, for an admin): 0.7 ms of SQLite per
# 1,000 on this machine. Each STATS_COST tasks count as one more call against the quota.
STATS_COST = 10_000

# Ended tasks are deleted after the retention (AGENTMESH_TASK_RETENTION_DAYS), this many per
# transaction, by a job that looks every PURGE_SECONDS.
PURGE_BATCH, PURGE_SECONDS = 500, 300.0

# The metrics' performance figures cover the tasks that ended in this window; durations are
# taken from the latest FIGURES_SAMPLE completed ones.
FIGURES_WINDOW = timedelta(hours=24)
FIGURES_SAMPLE = 10_000


def priority_label(priority: int) -> str:
    if priority <= 3:
        return "low"
    if priority <= 6:
        return "medium"
    return "high" if priority <= 8 else "critical"


def estimated_completion(task: TaskRow) -> datetime | None:
    """When a running task will end, at the pace of its attempt so far: the time from its lease
    to its latest progress report, carried on to 100 percent. Never past its time limit, when
    it ends either way. None before a report between 1 and 99 percent (nothing to go by), and
    for a task that is not running. Read from what is stored, so every read agrees."""
    if task.status != "running" or not 0 < task.progress < 100:
        return None
    begun = task.leased_at or task.started_at
    if begun is None:
        return None
    begun = aware(begun)
    # While a task runs, updated_at is its latest progress report (renewals leave it).
    estimate = begun + (aware(task.updated_at) - begun) * (100 / task.progress)
    if task.timeout_seconds > 0 and task.leased_at is not None:
        estimate = min(estimate, aware(task.leased_at) + timedelta(seconds=task.timeout_seconds))
    return estimate


@dataclass(frozen=True, kw_only=True)
class Figures:
    by_status: dict[str, int]  # every status, mesh-wide
    completed_today: int  # since midnight UTC
    average_seconds: float  # run times (start to completion) over FIGURES_WINDOW
    p95_seconds: float
    error_rate: float  # failed / (completed + failed) over FIGURES_WINDOW


@dataclass(frozen=True, kw_only=True)
class NewTask:
    """A create's fields; each optional one defaults to what a request without it means."""

    type: str
    description: str
    title: str = ""
    priority: int | None = None  # None: not given
    priority_label: str = ""
    model: str = ""
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    required_capabilities: Sequence[str] = ()
    idempotency_key: str = ""
    max_attempts: int | None = None  # None: not given
    callback_url: str = ""
    defer_start: bool = False
    timeout_seconds: int | None = None  # None: not given


def _too_long(field: str, value: str) -> None:
    if len(value) > LIMITS[field]:
        raise ValidationError(
            f"{field} is longer than {LIMITS[field]} characters",
            details={"field": field, "max": LIMITS[field]},
        )


def _check(new: NewTask) -> tuple[str, int, int, list[str]]:
    """Validates a new task; returns its type, priority, attempts and capabilities."""
    if not new.description.strip():
        raise ValidationError("description is required", details={"field": "description"})
    for field in LIMITS:
        _too_long(field, getattr(new, field))
    for field in LABELS:
        if invisible(getattr(new, field)):
            raise ValidationError(
                f"{field} must not hold control, format, private-use or unassigned characters",
                details={"field": field},
            )
    task_type = new.type or "general"
    if not TYPE_NAME.fullmatch(task_type):
        raise ValidationError(
            "type must be 1-64 letters, digits, '_', '.', ':' or '-'", details={"field": "type"}
        )
    priority = new.priority
    if priority is not None and not 1 <= priority <= 10:
        raise ValidationError("priority must be between 1 and 10", details={"field": "priority"})
    if new.priority_label:
        if new.priority_label not in PRIORITY_WORDS:
            raise ValidationError(
                "priority_label must be low, medium, high or critical",
                details={"field": "priority_label"},
            )
        if priority is not None and priority_label(priority) != new.priority_label:
            raise ValidationError(
                "priority and priority_label disagree", details={"field": "priority_label"}
            )
        priority = PRIORITY_WORDS[new.priority_label] if priority is None else priority
    priority = DEFAULT_PRIORITY if priority is None else priority
    attempts = DEFAULT_ATTEMPTS if new.max_attempts is None else new.max_attempts
    if not 1 <= attempts <= MAX_ATTEMPTS:
        raise ValidationError(
            f"max_attempts must be between 1 and {MAX_ATTEMPTS}", details={"field": "max_attempts"}
        )
    size = json_size(new.metadata)
    if size > METADATA_MAX_BYTES:
        raise ValidationError(
            f"metadata is larger than {METADATA_MAX_BYTES} bytes",
            details={"field": "metadata", "max": METADATA_MAX_BYTES},
        )
    if too_deep(new.metadata):
        raise ValidationError(
            f"metadata nests objects and arrays deeper than {NESTING_MAX} levels",
            details={"field": "metadata", "max_depth": NESTING_MAX},
        )
    caps = sorted(set(new.required_capabilities))
    if len(caps) > MAX_CAPABILITIES or any(not TYPE_NAME.fullmatch(c) for c in caps):
        raise ValidationError(
            f"required_capabilities: at most {MAX_CAPABILITIES} names like a type",
            details={"field": "required_capabilities"},
        )
    problem = url_problem(new.callback_url) if new.callback_url else ""
    if problem:
        raise ValidationError(
            f"callback_url must be an http or https URL: {problem}",
            details={"field": "callback_url"},
        )
    return task_type, priority, attempts, caps


def _digest(new: NewTask, task_type: str, priority: int, attempts: int, caps: list[str]) -> str:
    """What makes two creates the same request, as SHA-256 hex: every field of the create once
    the contract's defaults are applied (a priority given as a word or a number, a type left
    out or given as "general", capabilities in any order all read alike). The time limit is
    taken as sent: its default is the deployment's, which may change between a create and its
    retry. Canonical JSON (sorted keys, no spaces), so that it is stable across releases."""
    fields = {
        "type": task_type,
        "title": new.title.strip(),
        "description": new.description,
        "priority": priority,
        "model": new.model,
        "metadata": new.metadata,
        "required_capabilities": caps,
        "max_attempts": attempts,
        "callback_url": new.callback_url,
        "defer_start": new.defer_start,
        "timeout_seconds": new.timeout_seconds,
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _repeat(first: TaskRow, digest: str | None) -> TaskRow:
    """The first task of an idempotency key, if this create is the same request again
    (``digest``); tasks created before digests were kept answer any repeat, as they did."""
    if first.request_digest is not None and first.request_digest != digest:
        raise AlreadyExists(
            "this idempotency key was used for a different request; send the same request"
            " again to get its task, or use a new key for a new task",
            reason="IDEMPOTENCY_KEY_REUSED",
            details={"field": "idempotency_key", "task_id": first.task_id},
        )
    return first


def _not_found(task_id: str) -> NotFound:
    return NotFound("no such task", reason="TASK_NOT_FOUND", details={"task_id": task_id[:64]})


def _may_see(who: Principal, task: TaskRow) -> bool:
    return task.owner_id == who.subject or "admin" in who.roles


@dataclass(frozen=True)
class Stats:
    total: int
    active: int
    completed: int
    failed: int
    average_completion_time: float
    success_rate: float


def _time_limit(given: int | None, default: int) -> int:
    if given is None:
        return default
    if not 1 <= given <= TASK_TIMEOUT_MAX:
        raise ValidationError(
            f"timeout_seconds must be between 1 and {TASK_TIMEOUT_MAX}",
            details={"field": "timeout_seconds", "max": TASK_TIMEOUT_MAX},
        )
    return given


class Tasks:
    def __init__(
        self,
        *,
        db: Database,
        timeout_seconds: int = TASK_TIMEOUT_DEFAULT,
        open_per_user: int = OPEN_PER_USER,
    ) -> None:
        self._db = db
        self._timeout = timeout_seconds  # of a task that does not say
        # Unfinished tasks one user may hold: without a bound, a queue no agent serves grows
        # at the caller's quota (1,000 a minute of up to 164 KB each) for as long as it likes.
        self._open_max = open_per_user
        # By owner: (unfinished tasks at most, when counted), see OPEN_RECOUNT_SECONDS.
        self._open_seen: OrderedDict[str, tuple[int, float]] = OrderedDict()

    async def create(self, who: Principal, new: NewTask) -> tuple[TaskRow, bool]:
        """The new task, and whether it was created (False: an idempotent repeat)."""
        task_type, priority, attempts, caps = _check(new)
        timeout = _time_limit(new.timeout_seconds, self._timeout)
        key = new.idempotency_key or None
        digest = None if key is None else _digest(new, task_type, priority, attempts, caps)
        at = now()
        task = TaskRow(
            task_id=str(uuid.uuid4()),
            owner_id=who.subject,
            type=task_type,
            title=new.title.strip(),
            description=new.description,
            status="created" if new.defer_start else "queued",
            priority=priority,
            model=new.model,
            task_metadata=new.metadata,
            required_capabilities=caps,
            progress=0,
            assigned_agent="",
            attempt=0,
            max_attempts=attempts,
            timeout_seconds=timeout,
            result=None,
            error="",
            error_code="",
            idempotency_key=key,
            request_digest=digest,
            callback_url=new.callback_url,
            created_at=at,
            updated_at=at,
        )
        async with self._db.write() as s, s.begin():
            store = TaskStore(s)
            if key is not None:
                first = await store.by_idempotency_key(who.subject, key)
                if first is not None:
                    return _repeat(first, digest), False
            await self._within_open_limit(store, who.subject)
            if not await store.add(task):
                # A concurrent request with the same key committed first: answer its task.
                first = await store.by_idempotency_key(who.subject, key or "")
                if first is None:
                    raise Conflict("task could not be created; try again")
                return _repeat(first, digest), False
            Outbox(s).add("task.created", task, at, type=task.type, priority=task.priority)
        count, counted_at = self._open_seen.get(who.subject, (0, 0.0))
        self._open_seen[who.subject] = (count + 1, counted_at)
        return task, True

    async def _within_open_limit(self, store: TaskStore, owner_id: str) -> None:
        """Refuses a create past the owner's unfinished tasks (TASK_LIMIT_REACHED). Exact on
        SQLite, whose writers take turns; concurrent creates on PostgreSQL, or on another
        tasks replica within OPEN_RECOUNT_SECONDS, may pass it by a few."""
        seen = self._open_seen.get(owner_id)
        if (
            seen is None
            or time.monotonic() - seen[1] > OPEN_RECOUNT_SECONDS
            or seen[0] >= self._open_max * OPEN_NEAR
        ):
            count = await store.count_open(owner_id, OPEN, self._open_max)
            seen = self._open_seen[owner_id] = (count, time.monotonic())
            self._open_seen.move_to_end(owner_id)
            while len(self._open_seen) > OPEN_REMEMBERED:
                self._open_seen.popitem(last=False)
        if seen[0] >= self._open_max:
            raise RateLimited(
                f"you have {self._open_max} unfinished tasks, the most allowed; wait for some"
                " to finish, or cancel some",
                reason="TASK_LIMIT_REACHED",
                details={"max_open_tasks": self._open_max},
            )

    async def get(self, who: Principal, task_id: str) -> TaskRow:
        async with self._db.session() as s:
            task = await TaskStore(s).get(task_id)
        if task is None or not _may_see(who, task):
            raise _not_found(task_id)
        return task

    async def list(
        self, who: Principal, status: str, page: Page
    ) -> tuple[Sequence[TaskRow], int, Page]:
        """The page's tasks, how many match, and the page served: ``page``, or one that ends
        early (its limit the tasks it holds) when its tasks' large fields pass PAGE_MAX_BYTES
        characters, so that a page of tasks near their limits is never read whole."""
        if status and status not in STATUSES and status not in STATUS_ALIASES:
            raise ValidationError(
                f"status must be one of {', '.join(STATUSES)}", details={"field": "status"}
            )
        statuses = STATUS_ALIASES.get(status, (status,) if status else ())
        owner = None if "admin" in who.roles else who.subject
        async with self._db.session() as s:
            rows, total = await TaskStore(s).page(
                owner_id=owner,
                statuses=statuses,
                limit=page.limit,
                offset=page.offset,
                budget=PAGE_MAX_BYTES,
            )
        return rows, total, page.read(len(rows), total)

    async def result(self, who: Principal, task_id: str) -> TaskRow:
        task = await self.get(who, task_id)
        if task.status in TERMINAL and task.status not in ("completed", "failed"):
            # Final too: a client polling for the result has to stop here.
            raise Conflict(
                f"the task ended {task.status}: it has no result", details={"status": task.status}
            )
        if task.status not in ("completed", "failed"):
            raise Conflict("the task has not finished", details={"status": task.status})
        return task

    async def _end(
        self, who: Principal, task_id: str, status: str, event: str, **data: str
    ) -> TaskRow:
        """Ends an unfinished task as `stopped` or `cancelled`, with ``data`` in its event;
        repeating it changes nothing."""
        at = now()
        async with self._db.write() as s, s.begin():
            task = await TaskStore(s).get(task_id, lock=True)
            if task is None or not _may_see(who, task):
                raise _not_found(task_id)
            if task.status == status:
                return task
            if task.status in TERMINAL:
                raise Conflict(
                    f"the task has already ended {task.status}", details={"status": task.status}
                )
            # The agent holding it (assigned_agent stays, for the record) is told by the
            # servicer; a late result of this attempt is refused, as the task is no longer held.
            task.status = status
            task.lease_expires_at = None
            task.cancelled_at = at
            task.updated_at = at
            Outbox(s).add(event, task, at, **data)
        return task

    async def cancel(self, who: Principal, task_id: str) -> TaskRow:
        return await self._end(who, task_id, "cancelled", "task.cancelled")

    async def stop(self, who: Principal, task_id: str, reason: str = "") -> TaskRow:
        """Stops the task; ``reason``, the stopper's words, goes into its task.stopped event
        (the servicer passes it on to the agent holding it)."""
        if len(reason) > STOP_REASON_MAX:
            raise ValidationError(
                f"reason is longer than {STOP_REASON_MAX} characters",
                details={"field": "reason", "max": STOP_REASON_MAX},
            )
        extra = {"reason": reason} if reason else {}
        return await self._end(who, task_id, "stopped", "task.stopped", **extra)

    async def start(self, who: Principal, task_id: str) -> TaskRow:
        """Queues a `created` task; one already on its way is left as it is."""
        at = now()
        async with self._db.write() as s, s.begin():
            task = await TaskStore(s).get(task_id, lock=True)
            if task is None or not _may_see(who, task):
                raise _not_found(task_id)
            if task.status in TERMINAL:
                raise Conflict(
                    f"the task has already ended {task.status}", details={"status": task.status}
                )
            if task.status == "created":
                task.status = "queued"
                task.updated_at = at
                Outbox(s).add("task.queued", task, at)
        return task

    async def stats(self, who: Principal) -> Stats:
        owner = None if "admin" in who.roles else who.subject
        async with self._db.session() as s:
            store = TaskStore(s)
            counts = await store.count_by_status(owner)
            average = await store.average_seconds(owner)
        total = sum(counts.values())
        add_cost(total // STATS_COST)
        completed, failed = counts.get("completed", 0), counts.get("failed", 0)
        return Stats(
            total=total,
            active=sum(n for status, n in counts.items() if status in ACTIVE),
            completed=completed,
            failed=failed,
            average_completion_time=average,
            success_rate=completed / (completed + failed) if completed + failed else 0.0,
        )

    async def purge_ended(self, before: datetime, *, batch: int = PURGE_BATCH) -> int:
        """Deletes the tasks that ended (completed, failed, stopped, cancelled) before
        ``before``, a batch per transaction so that no write waits long; returns how many.
        Their events stay as long as the event retention keeps them."""
        deleted = 0
        while True:
            async with self._db.write() as s, s.begin():
                store = TaskStore(s)
                ids = await store.ended_before(TERMINAL, before, batch)
                if ids:
                    deleted += await store.delete(ids)
            if len(ids) < batch:
                return deleted

    async def keep_for(self, retention: timedelta, *, every: float = PURGE_SECONDS) -> None:
        """Runs for the life of the server: deletes ended tasks older than ``retention``."""
        while True:
            try:
                gone = await self.purge_ended(now() - retention)
            except Exception:  # a database hiccup must not end the job
                log.exception("task purge failed")
            else:
                if gone:
                    log.info("ended tasks past their retention deleted", extra={"count": gone})
            await asyncio.sleep(every)

    async def by_status(self) -> dict[str, int]:
        """How many tasks have each status, mesh-wide (every status, zeros included)."""
        async with self._db.session() as s:
            counts = await TaskStore(s).count_by_status(None)
        return {status: counts.get(status, 0) for status in STATUSES}

    async def figures(self) -> Figures:
        """The mesh-wide task figures of the metrics."""
        at = now()
        midnight = at.replace(hour=0, minute=0, second=0, microsecond=0)
        async with self._db.session() as s:
            store = TaskStore(s)
            counts = await store.count_by_status(None)
            today = await store.ended_since(midnight)
            window = await store.ended_since(at - FIGURES_WINDOW)
            seconds = sorted(
                await store.completion_seconds(since=at - FIGURES_WINDOW, limit=FIGURES_SAMPLE)
            )
        completed, failed = window.get("completed", 0), window.get("failed", 0)
        return Figures(
            by_status={status: counts.get(status, 0) for status in STATUSES},
            completed_today=today.get("completed", 0),
            average_seconds=sum(seconds) / len(seconds) if seconds else 0.0,
            p95_seconds=_nearest_rank(seconds, 0.95),
            error_rate=failed / (completed + failed) if completed + failed else 0.0,
        )


def _nearest_rank(ordered: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of the sorted values lie (nearest rank); 0 for none."""
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]
