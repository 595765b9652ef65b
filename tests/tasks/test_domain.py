"""The tasks domain on each database: concurrent idempotent creates, the outbox, the metrics'
figures and the retention of ended tasks."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import ColumnElement, func, select, update

from servers.common.clock import now
from servers.common.context import CallState, Principal, enter_call, leave_call
from servers.common.db import Database
from servers.common.errors import AlreadyExists, NotFound, RateLimited
from servers.common.pagination import Page
from servers.mesh import MIGRATIONS
from servers.tasks import domain
from servers.tasks.dispatch import Dispatch
from servers.tasks.domain import NewTask, Tasks, estimated_completion
from servers.tasks.models import OutboxRow, TaskRow

ALICE = Principal(subject="alice", kind="user", roles=("user",))
BOB = Principal(subject="bob", kind="user", roles=("user",))
NEW = NewTask(type="echo", description="say hello")


async def _db(url: str) -> Database:
    db = Database(url)
    for service, folder in MIGRATIONS.items():
        if folder is not None:
            await db.migrate(service, folder)
    return db


async def _count(db: Database, model: type, *where: ColumnElement[bool]) -> int:
    async with db.session() as s:
        return int(
            (await s.execute(select(func.count()).select_from(model).where(*where))).scalar_one()
        )


async def test_concurrent_creates_with_one_key_make_one_task(database_url: str) -> None:
    db = await _db(database_url)
    try:
        tasks = Tasks(db=db)
        keyed = replace(NEW, idempotency_key="order-42")
        results = await asyncio.gather(*(tasks.create(ALICE, keyed) for _ in range(10)))
        ids = {task.task_id for task, _ in results}
        assert len(ids) == 1
        assert sum(created for _, created in results) == 1
        assert await _count(db, TaskRow, TaskRow.owner_id == "alice") == 1
        # The key is the owner's: another user's same key is another task.
        other, created = await tasks.create(BOB, keyed)
        assert created and other.task_id not in ids
    finally:
        await db.close()


async def test_every_change_writes_its_event(database_url: str) -> None:
    db = await _db(database_url)
    try:
        tasks = Tasks(db=db)
        task, _ = await tasks.create(ALICE, replace(NEW, defer_start=True))
        await tasks.start(ALICE, task.task_id)
        await tasks.start(ALICE, task.task_id)  # no change, no event
        await tasks.cancel(ALICE, task.task_id)
        async with db.session() as s:
            events = (
                await s.execute(
                    select(OutboxRow.event_type, OutboxRow.data)
                    .where(OutboxRow.subject_id == task.task_id)
                    .order_by(OutboxRow.id)
                )
            ).all()
        assert [e for e, _ in events] == ["task.created", "task.queued", "task.cancelled"]
        assert [d["status"] for _, d in events] == ["created", "queued", "cancelled"]
    finally:
        await db.close()


async def test_figures_of_the_metrics(database_url: str) -> None:
    """Tasks by status, completed today, run times and the error rate, on each database."""
    db = await _db(database_url)
    try:
        tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=30)
        for _ in range(4):
            await tasks.create(ALICE, NEW)
        for outcome in ("done", "done", "failed"):
            held = await dispatch.claim("agent-1", ["echo"])
            assert held is not None and held.attempt_token
            await dispatch.complete(
                held.task_id,
                "agent-1",
                held.attempt_token,
                result={"ok": True} if outcome == "done" else None,
                error=None if outcome == "done" else ("BROKEN", "it broke", False),
            )
        figures = await tasks.figures()
        assert {k: v for k, v in figures.by_status.items() if v} == {
            "queued": 1,
            "completed": 2,
            "failed": 1,
        }
        assert figures.completed_today == 2
        assert figures.error_rate == 1 / 3
        assert 0 <= figures.average_seconds <= figures.p95_seconds < 5
    finally:
        await db.close()


async def test_ended_tasks_past_the_retention_are_deleted(database_url: str) -> None:
    """Every kind of ended task older than the retention goes, in batches; a task still on its
    way or held, however old, and a recently ended one stay. On each database."""
    db = await _db(database_url)
    try:
        tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=30)
        old = {}
        for name in ("completed", "failed", "cancelled", "stopped", "held", "queued", "recent"):
            old[name], _ = await tasks.create(ALICE, replace(NEW, idempotency_key=name))
        for name, error in (("completed", None), ("failed", ("BROKEN", "it broke", False))):
            held = await dispatch.claim("agent-1", ["echo"])
            assert held is not None and held.task_id == old[name].task_id
            await dispatch.complete(
                held.task_id, "agent-1", held.attempt_token or "", result={}, error=error
            )
        await tasks.cancel(ALICE, old["cancelled"].task_id)
        await tasks.stop(ALICE, old["stopped"].task_id)
        held = await dispatch.claim("agent-1", ["echo"])
        assert held is not None and held.task_id == old["held"].task_id
        await tasks.cancel(ALICE, old["recent"].task_id)
        # Everything but "recent" last changed 40 days ago.
        long_ago = now() - timedelta(days=40)
        async with db.write() as s, s.begin():
            await s.execute(
                update(TaskRow)
                .where(TaskRow.task_id != old["recent"].task_id)
                .values(updated_at=long_ago)
            )

        assert await tasks.purge_ended(now() - timedelta(days=30), batch=3) == 4
        kept = {name for name, task in old.items() if await _exists(tasks, task.task_id)}
        assert kept == {"held", "queued", "recent"}
        assert await tasks.purge_ended(now() - timedelta(days=30)) == 0
        # The idempotency key of a deleted task is free again.
        again, created = await tasks.create(ALICE, replace(NEW, idempotency_key="completed"))
        assert created and again.task_id != old["completed"].task_id
    finally:
        await db.close()


async def test_the_stats_count_against_the_quota_by_the_tasks_they_read(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stats read every task of the caller (everyone's for an admin): one more call per
    STATS_COST of them, and the average run time from the database itself."""
    monkeypatch.setattr(domain, "STATS_COST", 10)
    db = await _db(database_url)
    try:
        tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=30)
        for _ in range(25):
            await tasks.create(ALICE, NEW)
        for _ in range(5):
            await tasks.create(BOB, NEW)
        for _ in range(2):
            held = await dispatch.claim("agent-1", ["echo"])
            assert held is not None
            await dispatch.complete(
                held.task_id, "agent-1", held.attempt_token or "", result={}, error=None
            )
        admin = Principal(subject="root", kind="user", roles=("admin",))
        for who, total, cost in ((ALICE, 25, 2), (BOB, 5, 0), (admin, 30, 3)):
            call = CallState(
                method="/agentmesh.v1.TasksService/GetStats", request_id="r", via_gateway=False
            )
            token = enter_call(call)
            try:
                stats = await tasks.stats(who)
            finally:
                leave_call(token)
            assert (stats.total, call.cost) == (total, cost)
        assert stats.completed == 2 and 0 <= stats.average_completion_time < 5
    finally:
        await db.close()


async def test_a_page_of_large_tasks_is_cut_before_it_is_read(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database sizes the page's large fields first: the rows past the budget (after the
    first) are never loaded, and the page says where the next one starts."""
    monkeypatch.setattr(domain, "PAGE_MAX_BYTES", 1000)
    db = await _db(database_url)
    try:
        tasks = Tasks(db=db)
        made = []
        for n in range(5):  # 400 characters of description, "{}" of metadata, no result
            task, _ = await tasks.create(ALICE, replace(NEW, description=f"{n}" * 400))
            made.append(task.task_id)
        newest = made[::-1]
        rows, total, served = await tasks.list(ALICE, "", Page(limit=10, offset=0))
        # 0, 402 and 804 characters come before the first three; 1,206 before the fourth.
        assert [r.task_id for r in rows] == newest[:3] and total == 5
        assert served == Page(limit=3, offset=0)
        rows, total, served = await tasks.list(ALICE, "", Page(limit=10, offset=3))
        assert [r.task_id for r in rows] == newest[3:] and served == Page(limit=10, offset=3)
        monkeypatch.setattr(domain, "PAGE_MAX_BYTES", 0)  # one task, however large
        rows, _, served = await tasks.list(ALICE, "", Page(limit=10, offset=1))
        assert [r.task_id for r in rows] == newest[1:2] and served == Page(limit=1, offset=1)
    finally:
        await db.close()


async def _exists(tasks: Tasks, task_id: str) -> bool:
    try:
        await tasks.get(ALICE, task_id)
    except NotFound:
        return False
    return True


async def test_the_retention_job_deletes_as_tasks_age(database_url: str) -> None:
    db = await _db(database_url)
    try:
        tasks = Tasks(db=db)
        task, _ = await tasks.create(ALICE, NEW)
        await tasks.cancel(ALICE, task.task_id)
        job = asyncio.create_task(tasks.keep_for(timedelta(seconds=0.2), every=0.05))
        try:
            async with asyncio.timeout(10):
                while await _exists(tasks, task.task_id):
                    await asyncio.sleep(0.05)
        finally:
            job.cancel()
    finally:
        await db.close()


async def test_a_key_answers_only_the_request_it_was_first_used_for(database_url: str) -> None:
    """A retry is the same request and gets the key's task; the key with other fields is
    refused, naming that task, and creates nothing. Fields compare as the contract reads them."""
    db = await _db(database_url)
    try:
        tasks = Tasks(db=db)
        keyed = replace(
            NEW,
            idempotency_key="order-7",
            priority_label="high",
            metadata={"n": 1},
            required_capabilities=("b", "a"),
        )
        first, created = await tasks.create(ALICE, keyed)
        assert created
        alike = replace(keyed, priority_label="", priority=8, required_capabilities=("a", "b"))
        for retry in (keyed, alike, replace(keyed, title="  ", type="echo")):
            again, created = await tasks.create(ALICE, retry)
            assert (again.task_id, created) == (first.task_id, False)
        changes: dict[str, Any] = {
            "type": "general",
            "title": "t",
            "description": "say goodbye",
            "priority_label": "low",
            "model": "m",
            "metadata": {"n": 2},
            "required_capabilities": ("a",),
            "max_attempts": 5,
            "callback_url": "https://example.com/hook",
            "defer_start": True,
            "timeout_seconds": 60,
        }
        for field, value in changes.items():
            with pytest.raises(AlreadyExists) as refused:
                await tasks.create(ALICE, replace(keyed, **{field: value}))
            assert refused.value.reason == "IDEMPOTENCY_KEY_REUSED", field
            assert refused.value.details == {"field": "idempotency_key", "task_id": first.task_id}
        assert await _count(db, TaskRow, TaskRow.owner_id == "alice") == 1
        # Another owner's same key, with any fields, is another task.
        assert (await tasks.create(BOB, replace(keyed, description="other")))[1]
    finally:
        await db.close()


async def test_concurrent_creates_with_one_key_and_other_fields_make_one_task(
    database_url: str,
) -> None:
    """Whichever create wins the key, the others get its task if they are the same request
    and IDEMPOTENCY_KEY_REUSED if not; on PostgreSQL the losers meet the unique index."""
    db = await _db(database_url)
    try:
        tasks = Tasks(db=db)
        asks = [
            replace(NEW, idempotency_key="k-9", description=f"variant {n % 2}") for n in range(20)
        ]
        results = await asyncio.gather(
            *(tasks.create(ALICE, ask) for ask in asks), return_exceptions=True
        )
        made = [r for r in results if not isinstance(r, BaseException)]
        task = next(t for t, created in made if created)
        assert sum(created for _, created in made) == 1
        for ask, result in zip(asks, results, strict=True):
            if ask.description == task.description:
                assert not isinstance(result, BaseException)
                assert result[0].task_id == task.task_id
            else:
                assert isinstance(result, AlreadyExists), result
                assert result.details["task_id"] == task.task_id
        assert await _count(db, TaskRow, TaskRow.owner_id == "alice") == 1
    finally:
        await db.close()


async def test_a_key_of_a_task_from_before_digests_answers_any_repeat(database_url: str) -> None:
    """A task created before the mesh kept request digests cannot tell a retry from another
    request; it is answered as before the upgrade rather than refused."""
    db = await _db(database_url)
    try:
        tasks = Tasks(db=db)
        first, _ = await tasks.create(ALICE, replace(NEW, idempotency_key="old"))
        async with db.write() as s, s.begin():
            await s.execute(update(TaskRow).values(request_digest=None))
        other = replace(NEW, idempotency_key="old", description="not the same")
        again, created = await tasks.create(ALICE, other)
        assert (again.task_id, created) == (first.task_id, False)
    finally:
        await db.close()


async def test_a_user_holds_a_bounded_number_of_unfinished_tasks(database_url: str) -> None:
    """Without a bound, a queue no agent serves grows at the caller's quota for as long as it
    likes. Deferred (created) tasks count; ended ones free their place; an idempotent repeat is
    still answered at the limit; another user has a limit of its own."""
    db = await _db(database_url)
    try:
        tasks = Tasks(db=db, open_per_user=3)
        keyed, _ = await tasks.create(ALICE, replace(NEW, idempotency_key="k-1"))
        await tasks.create(ALICE, replace(NEW, defer_start=True))
        third, _ = await tasks.create(ALICE, NEW)
        with pytest.raises(RateLimited) as refused:
            await tasks.create(ALICE, NEW)
        assert refused.value.reason == "TASK_LIMIT_REACHED"
        assert refused.value.details == {"max_open_tasks": "3"}
        again, created = await tasks.create(ALICE, replace(NEW, idempotency_key="k-1"))
        assert (again.task_id, created) == (keyed.task_id, False)
        assert (await tasks.create(BOB, NEW))[1]
        await tasks.cancel(ALICE, third.task_id)
        assert (await tasks.create(ALICE, NEW))[1]
        assert await _count(db, TaskRow, TaskRow.owner_id == "alice") == 4
    finally:
        await db.close()


def test_the_estimated_completion_follows_the_attempts_pace_within_its_time_limit() -> None:
    leased = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    task = TaskRow(
        status="running",
        progress=25,
        leased_at=leased,
        started_at=leased + timedelta(seconds=2),
        updated_at=leased + timedelta(seconds=10),
        timeout_seconds=0,
    )
    # A quarter in 10 s: done 40 s after the lease.
    assert estimated_completion(task) == leased + timedelta(seconds=40)
    # The time limit ends it first.
    task.timeout_seconds = 30
    assert estimated_completion(task) == leased + timedelta(seconds=30)
    # Nothing to go by, or nothing to come.
    for status, progress in (("running", 0), ("running", 100), ("assigned", 50), ("queued", 50)):
        task.status, task.progress = status, progress
        assert estimated_completion(task) is None, (status, progress)
