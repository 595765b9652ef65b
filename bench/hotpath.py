"""The tasks service's three write transactions, in process, against the same writes made with
sqlite3 alone: how much of a task's cost is the mesh's Python and how much is SQLite.

  mesh_create    Tasks.create: one task in, with its task.created event (the CreateTask RPC,
                 without gRPC)
  mesh_claim     Dispatch.claim: the first queued task an agent can do, leased to it, with its
                 task.assigned event (ClaimTask)
  mesh_complete  Dispatch.complete with the next claim: the result recorded, its
                 task.completed event, and the agent's next task leased in the same
                 transaction (CompleteTask, as a busy agent's stream sends it with a backlog)
  raw_*          the baseline: the same statements on the same schema, one transaction each as
                 the mesh's, written with sqlite3 and nothing else

Each case runs on its own database file of the embedded default (WAL, synchronous=NORMAL,
migrated by the mesh's migrations), for --seconds or MAX_OPS operations, whichever ends first,
after --warmup unmeasured ones; a baseline case does at most as many operations as the mesh's,
so that both work on queues of the same depth. The claims take the tasks the creates queued, and
the completes finish the tasks the claims (and the completes) leased. Latency is one operation's,
measured around it.

A ratio mesh/raw of 0.3 means the mesh does a third of the operations sqlite3 alone would: the
rest is SQLAlchemy's session and statement machinery and the mesh's own code around it. Each
task of the dispatch benchmark's burst pays a create, a claim and a complete (which finds no next
task when the agents keep up).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path

from bench.auth_me import CaseResult, Report, Settings, _percentile
from servers.common.clock import now
from servers.common.context import Principal
from servers.common.db import Database
from servers.common.sqlite_inline import Checkpointer
from servers.mesh import MIGRATIONS
from servers.tasks.dispatch import Dispatch
from servers.tasks.domain import NewTask, Tasks

NAME = "hotpath"
BASELINE = "raw_create, raw_claim, raw_complete (sqlite3 alone, the same writes)"
MAX_OPS = 20_000  # per case, whatever --seconds says
LEASE_SECONDS = 300
TASK_TYPE = "noop"
AGENT = "bench-agent"
OWNER = str(uuid.uuid4())

Op = Callable[[], Awaitable[bool]]  # one operation; False: nothing left to do


async def _measure(
    name: str, op: Op, *, seconds: float, warmup: int, most: int = MAX_OPS
) -> CaseResult:
    for _ in range(warmup):
        if not await op():
            break
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + seconds
    while len(latencies) < most and time.perf_counter() < deadline:
        begun = time.perf_counter()
        if not await op():
            break
        latencies.append((time.perf_counter() - begun) * 1000.0)
    elapsed = sum(latencies) / 1000.0
    latencies.sort()
    return CaseResult(
        name=name,
        requests=len(latencies),
        errors=0,
        seconds=elapsed,
        p50_ms=_percentile(latencies, 0.50),
        p99_ms=_percentile(latencies, 0.99),
        first_error="",
    )


async def _phases(
    system: str,
    ops: tuple[Op, Op, Op],
    settings: Settings,
    counts: tuple[int, ...] = (MAX_OPS,) * 3,
) -> list[CaseResult]:
    """The create, claim and complete cases of one system, in order, each of at most its
    count of operations (the baseline's are the mesh's: the same queue depths). The creates'
    warm-up is three times the others', so that every later warm-up has tasks to work on."""
    names = ("create", "claim", "complete")
    return [
        await _measure(
            f"{system}_{name}",
            op,
            seconds=settings.seconds,
            warmup=settings.warmup * (3 if name == "create" else 1),
            most=most,
        )
        for name, op, most in zip(names, ops, counts, strict=True)
    ]


async def _migrated(path: Path) -> Database:
    db = Database(f"sqlite+aiosqlite:///{path}")
    for service, folder in MIGRATIONS.items():
        if folder is not None:
            await db.migrate(service, folder)
    return db


async def _mesh_cases(folder: Path, settings: Settings) -> list[CaseResult]:
    db = await _migrated(folder / "mesh.db")
    try:
        tasks = Tasks(db=db, open_per_user=10 * MAX_OPS)
        dispatch = Dispatch(db=db, lease_seconds=LEASE_SECONDS)
        who = Principal(subject=OWNER, kind="user", roles=("developer",))
        new = NewTask(type=TASK_TYPE, description="bench no-op")
        held: list[tuple[str, str]] = []

        async def create() -> bool:
            await tasks.create(who, new)
            return True

        async def claim() -> bool:
            task = await dispatch.claim(AGENT, [TASK_TYPE])
            if task is None:
                return False
            held.append((task.task_id, task.attempt_token or ""))
            return True

        async def complete() -> bool:
            if not held:
                return False
            task_id, token = held.pop()
            outcome = await dispatch.complete(
                task_id, AGENT, token, result={}, error=None, claim_next=[TASK_TYPE]
            )
            if not outcome.accepted:
                raise RuntimeError(f"complete of {task_id}: {outcome}")
            if outcome.next is not None:  # handed to the agent in the freed slot
                held.append((outcome.next.task_id, outcome.next.attempt_token or ""))
            return True

        return await _phases("mesh", (create, claim, complete), settings)
    finally:
        await db.close()


# The baseline's statements: what the mesh's transactions write, column for column.
_COLUMNS = (
    "task_id, owner_id, type, title, description, status, priority, model, metadata,"
    " required_capabilities, progress, assigned_agent, attempt, max_attempts, result, error,"
    " error_code, idempotency_key, callback_url, created_at, updated_at, timeout_seconds"
)
_INSERT_TASK = (
    f"INSERT INTO tasks_tasks ({_COLUMNS}) VALUES ({', '.join('?' * 22)})"
    " ON CONFLICT (owner_id, idempotency_key) DO NOTHING RETURNING task_id"
)
_INSERT_EVENT = (
    "INSERT INTO tasks_outbox (event_type, subject_id, owner_id, data, created_at)"
    " VALUES (?, ?, ?, ?, ?)"
)
_QUEUE = (
    "SELECT task_id, type, CAST(required_capabilities AS TEXT) FROM tasks_tasks"
    " WHERE status = 'queued' AND (type IN (?) OR CAST(required_capabilities AS TEXT) != '[]')"
    " ORDER BY priority DESC, created_at, task_id LIMIT 20 OFFSET 0"
)
_LEASE = (
    "UPDATE tasks_tasks SET status = 'assigned', assigned_agent = ?, attempt = attempt + 1,"
    " attempt_token = ?, lease_expires_at = ?, leased_at = ?, updated_at = ?"
    " WHERE task_id = ? AND status = 'queued' RETURNING *"
)
_COMPLETE = (
    "UPDATE tasks_tasks SET status = 'completed', result = ?, progress = 100,"
    " completed_at = ?, started_at = coalesce(started_at, updated_at),"
    " lease_expires_at = NULL, updated_at = ?"
    " WHERE task_id = ? AND assigned_agent = ? AND attempt_token = ?"
    " AND status IN ('assigned', 'running') RETURNING *"
)


def _stamp(moment: datetime) -> str:
    """A timestamp as SQLAlchemy stores it in SQLite."""
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


def _event(conn: sqlite3.Connection, kind: str, task_id: str, at: str, **data: object) -> None:
    payload = {"task_id": task_id, "callback": False, **data}
    conn.execute(_INSERT_EVENT, (kind, task_id, OWNER, json.dumps(payload), at))


async def _raw_cases(folder: Path, settings: Settings, counts: tuple[int, ...]) -> list[CaseResult]:
    path = folder / "raw.db"
    await (await _migrated(path)).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    # As the mesh's connections: checkpoints are a thread's work every second, never a
    # commit's (the mesh's own Checkpointer).
    conn.execute("PRAGMA wal_autocheckpoint=0")
    checkpoints = Checkpointer(str(path))
    checkpoints.start()
    held: list[tuple[str, str]] = []
    try:

        async def create() -> bool:
            task_id, at = str(uuid.uuid4()), _stamp(now())
            conn.execute("BEGIN IMMEDIATE")
            row = (TASK_TYPE, "", "bench no-op", "queued", 5, "", "{}", "[]", 0, "", 0, 3, None)
            values = (task_id, OWNER, *row, "", "", None, "", at, at, 3600)
            conn.execute(_INSERT_TASK, values).fetchall()
            _event(conn, "task.created", task_id, at, status="queued", type=TASK_TYPE, priority=5)
            conn.execute("COMMIT")
            return True

        def lease_first(moment: datetime) -> bool:
            """Inside a transaction: leases the first queued task, as Dispatch._lease_next."""
            first = conn.execute(_QUEUE, (TASK_TYPE,)).fetchone()
            if first is None:
                return False
            at, until = _stamp(moment), _stamp(moment + timedelta(seconds=LEASE_SECONDS))
            token = str(uuid.uuid4())
            if conn.execute(_LEASE, (AGENT, token, until, at, at, first[0])).fetchone() is None:
                return False
            _event(conn, "task.assigned", first[0], at, status="assigned", agent_id=AGENT)
            held.append((first[0], token))
            return True

        async def claim() -> bool:
            conn.execute("BEGIN IMMEDIATE")
            leased = lease_first(now())
            conn.execute("COMMIT")
            return leased

        async def complete() -> bool:
            if not held:
                return False
            task_id, token = held.pop()
            moment = now()
            at = _stamp(moment)
            conn.execute("BEGIN IMMEDIATE")
            done = conn.execute(_COMPLETE, ("{}", at, at, task_id, AGENT, token)).fetchone()
            if done is None:
                conn.execute("ROLLBACK")
                raise RuntimeError(f"raw complete of {task_id} changed nothing")
            _event(conn, "task.completed", task_id, at, status="completed", agent_id=AGENT)
            lease_first(moment)  # the agent's next task, as the mesh's claim_next
            conn.execute("COMMIT")
            return True

        return await _phases("raw", (create, claim, complete), settings, counts)
    finally:
        await checkpoints.stop()
        conn.close()


def run(settings: Settings) -> Report:
    logging.getLogger("agentmesh").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-hotpath-") as tmp:
        mesh = asyncio.run(_mesh_cases(Path(tmp), settings))
        counts = tuple(case.requests for case in mesh)
        raw = asyncio.run(_raw_cases(Path(tmp), settings, counts))
    by_name = {case.name: case for case in mesh + raw}
    per_task = sum(1000.0 / by_name[f"mesh_{op}"].rps for op in ("create", "claim", "complete"))
    floor = sum(1000.0 / by_name[f"raw_{op}"].rps for op in ("create", "claim", "complete"))
    return Report(
        name=NAME,
        title="the tasks service's write transactions in process, against sqlite3 alone",
        baseline=BASELINE,
        cases=mesh + raw,
        ratios=tuple((f"mesh_{op}", f"raw_{op}") for op in ("create", "claim", "complete")),
        notes=[
            f"one create, claim and complete: {per_task:.3f} ms in the mesh, {floor:.3f} ms"
            " with sqlite3 alone (of one core, nothing else running)",
            "requests/s = operations over the sum of their own times; every case runs on the"
            " loop's thread (SQLite inline, as in the embedded mesh)",
        ],
    )
