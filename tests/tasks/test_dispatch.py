"""Leases and fencing in the tasks domain, on each database; and the claim an outcome carries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from agentmesh.v1 import tasks_pb2
from servers.common.clock import aware
from servers.common.db import Database
from servers.common.errors import ValidationError
from servers.common.internal import InternalChannel
from servers.tasks.dispatch import CLAIM_PAGE, Dispatch
from servers.tasks.domain import Tasks
from servers.tasks.models import TaskRow
from servers.tasks.service import Agents, TasksInternalService
from servers.tasks.store import TaskStore
from tests.tasks.test_domain import ALICE, NEW, _db


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await _db(database_url)
    yield database
    await database.close()


async def test_most_urgent_first_then_first_in(db: Database) -> None:
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=30)
    low, _ = await tasks.create(ALICE, replace(NEW, priority=2))
    first_high, _ = await tasks.create(ALICE, replace(NEW, priority=9))
    second_high, _ = await tasks.create(ALICE, replace(NEW, priority=9))
    order = [await dispatch.claim("agent-1", ["echo"]) for _ in range(4)]
    assert [t.task_id if t else None for t in order] == [
        first_high.task_id,
        second_high.task_id,
        low.task_id,
        None,
    ]


async def test_capabilities_decide_who_may_take_a_task(db: Database) -> None:
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=30)
    review, _ = await tasks.create(
        ALICE, replace(NEW, type="code_review", required_capabilities=("code_review", "python"))
    )
    assert await dispatch.claim("echo-only", ["echo"]) is None
    assert await dispatch.claim("reviewer", ["code_review"]) is None  # lacks "python"
    claimed = await dispatch.claim("reviewer", ["code_review", "python", "echo"])
    assert claimed is not None and claimed.task_id == review.task_id
    assert claimed.status == "assigned" and claimed.attempt == 1 and claimed.attempt_token


async def test_a_claim_looks_past_tasks_the_agent_cannot_do(db: Database) -> None:
    """More than a page of queued tasks ahead that the agent cannot do (other types, and
    requirements it lacks), of higher priority: it still gets the one it can, and the others
    stay queued for agents that can."""
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=30)
    for number in range(CLAIM_PAGE + 5):
        other = "summarise" if number % 2 else "code_review"
        needs = ("python",) if number % 3 == 0 else ()
        await tasks.create(ALICE, replace(NEW, type=other, priority=9, required_capabilities=needs))
    mine, _ = await tasks.create(ALICE, replace(NEW, type="echo", priority=2))
    claimed = await dispatch.claim("echo-only", ["echo"])
    assert claimed is not None and claimed.task_id == mine.task_id
    assert await dispatch.claim("echo-only", ["echo"]) is None
    python = await dispatch.claim("python-dev", ["python"])
    assert python is not None and python.required_capabilities == ["python"]


async def test_concurrent_claims_take_each_task_once(db: Database) -> None:
    """Claims read the queue before they take the write lock, so several can see the same
    task first: one gets it, the others take the next ones, and none is handed out twice."""
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=30)
    created = {(await tasks.create(ALICE, NEW))[0].task_id for _ in range(12)}

    async def agent(name: str) -> list[str]:
        taken = []
        while (task := await dispatch.claim(name, ["echo"])) is not None:
            taken.append(task.task_id)
        return taken

    claims = await asyncio.gather(*(agent(f"agent-{n}") for n in range(5)))
    everything = [task_id for taken in claims for task_id in taken]
    assert sorted(everything) == sorted(created)  # each once, none left queued
    for name, taken in zip((f"agent-{n}" for n in range(5)), claims, strict=True):
        for task_id in taken:
            assert (await dispatch.get(task_id)).assigned_agent == name


async def test_a_stale_attempt_is_refused(db: Database) -> None:
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=0.2)
    task, _ = await tasks.create(ALICE, NEW)
    first = await dispatch.claim("agent-1", ["echo"])
    assert first is not None and first.attempt_token
    old_token = first.attempt_token
    assert isinstance(await dispatch.progress(task.task_id, "agent-1", old_token, 10, ""), TaskRow)
    await asyncio.sleep(0.3)
    lost = await dispatch.expire_leases()
    assert [(x.task_id, x.agent_id, x.requeued) for x in lost] == [(task.task_id, "agent-1", True)]
    # Queued again, it shows nothing of the attempt that ended but its error.
    requeued = await tasks.get(ALICE, task.task_id)
    assert (requeued.status, requeued.progress, requeued.assigned_agent) == ("queued", 0, "")
    assert requeued.started_at is None and requeued.error_code == "LEASE_EXPIRED"
    second = await dispatch.claim("agent-2", ["echo"])
    assert second is not None and second.attempt == 2 and second.attempt_token != old_token
    # The first holder, thawed, reports late: refused, with the state that refuses it; its
    # result changes nothing.
    assert await dispatch.progress(task.task_id, "agent-1", old_token, 50, "") == "assigned"
    assert await dispatch.progress("no-such-task", "agent-1", old_token, 50, "") == ""
    late = await dispatch.complete(task.task_id, "agent-1", old_token, result={"x": 1}, error=None)
    assert not late.accepted and late.reason == "CONFLICT"
    done = await dispatch.complete(
        task.task_id, "agent-2", second.attempt_token or "", result={"ok": True}, error=None
    )
    assert done.accepted and done.status == "completed"
    # The same outcome sent again (no ack seen) is accepted again, and changes nothing.
    again = await dispatch.complete(
        task.task_id, "agent-2", second.attempt_token or "", result={"other": 1}, error=None
    )
    assert again.accepted
    final = await tasks.get(ALICE, task.task_id)
    assert final.result == {"ok": True} and final.attempt == 2
    # The first attempt's error does not describe a task that completed.
    assert (final.error, final.error_code) == ("", "")


async def test_a_task_never_reported_running_ran_from_its_lease(db: Database) -> None:
    """An agent need not report progress: the run time of a task it only completed counts
    from the moment it was leased, not zero (the stats' and the metrics' durations)."""
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=30)
    await tasks.create(ALICE, NEW)
    leased = await dispatch.claim("agent-1", ["echo"])
    assert leased is not None and leased.started_at is None
    await dispatch.renew("agent-1", [leased.task_id])  # renewals do not move the start
    await asyncio.sleep(0.2)
    done = await dispatch.complete(
        leased.task_id, "agent-1", leased.attempt_token or "", result={}, error=None
    )
    assert done.task is not None and done.task.started_at is not None
    assert aware(done.task.started_at) == aware(leased.updated_at)
    assert done.task.completed_at is not None
    ran = (aware(done.task.completed_at) - aware(done.task.started_at)).total_seconds()
    assert 0.2 <= ran < 5
    # SQLite's julianday() keeps milliseconds.
    assert (await tasks.stats(ALICE)).average_completion_time == pytest.approx(ran, abs=0.002)


async def test_a_restart_gives_every_lease_one_more_before_it_runs_out(db: Database) -> None:
    """The mesh was down longer than a lease: no agent could renew it. The restarted server
    lets every lease run one whole lease after its start, so that an agent that finished the
    work meanwhile can reconnect and report it; then leases run out as before."""
    tasks = Tasks(db=db)
    task, _ = await tasks.create(ALICE, replace(NEW, max_attempts=1))
    first = Dispatch(db=db, lease_seconds=0.3)
    leased = await first.claim("agent-1", ["echo"])
    assert leased is not None
    await asyncio.sleep(0.5)  # "down" past the lease
    restarted = Dispatch(db=db, lease_seconds=0.3)
    assert await restarted.expire_leases() == []
    done = await restarted.complete(
        task.task_id, "agent-1", leased.attempt_token or "", result={"ok": True}, error=None
    )
    assert done.accepted and done.status == "completed"
    # The grace is one lease: past it, a lease that ran out is lost as always.
    other, _ = await tasks.create(ALICE, NEW)
    assert await restarted.claim("agent-2", ["echo"]) is not None
    await asyncio.sleep(0.35)
    lost = await restarted.expire_leases()
    assert [(x.task_id, x.requeued) for x in lost] == [(other.task_id, True)]


async def test_the_last_attempt_fails_the_task(db: Database) -> None:
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=0.1)
    task, _ = await tasks.create(ALICE, replace(NEW, max_attempts=2))
    for _ in range(2):
        assert await dispatch.claim("agent-1", ["echo"]) is not None
        await asyncio.sleep(0.15)
        await dispatch.expire_leases()
    final = await tasks.get(ALICE, task.task_id)
    assert final.status == "failed" and final.error_code == "LEASE_EXPIRED"
    assert final.attempt == 2 and "attempt 2" in final.error
    assert await dispatch.claim("agent-1", ["echo"]) is None


async def test_retryable_errors_retry_until_the_last_attempt(db: Database) -> None:
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=30)
    task, _ = await tasks.create(ALICE, replace(NEW, max_attempts=2))
    a = await dispatch.claim("agent-1", ["echo"])
    assert a is not None
    first = await dispatch.complete(
        task.task_id,
        "agent-1",
        a.attempt_token or "",
        result=None,
        error=("INTERNAL_ERROR", "boom", True),
    )
    assert first.accepted and first.status == "queued"
    # Sent again (its answer was lost): the same answer, and nothing changes.
    repeat = await dispatch.complete(
        task.task_id,
        "agent-1",
        a.attempt_token or "",
        result=None,
        error=("INTERNAL_ERROR", "boom", True),
    )
    assert (repeat.accepted, repeat.status, repeat.fresh) == (True, "queued", False)
    assert (await tasks.get(ALICE, task.task_id)).attempt == 1
    # Another error of that attempt, or its result, is not a repeat: refused.
    for other in (("INTERNAL_ERROR", "other", True), None):
        late = await dispatch.complete(
            task.task_id, "agent-1", a.attempt_token or "", result={}, error=other
        )
        assert (late.accepted, late.reason) == (False, "CONFLICT")
    b = await dispatch.claim("agent-1", ["echo"])
    assert b is not None
    second = await dispatch.complete(
        task.task_id,
        "agent-1",
        b.attempt_token or "",
        result=None,
        error=("INTERNAL_ERROR", "boom", True),
    )
    assert second.status == "failed"


async def test_a_cancelled_task_refuses_its_result(db: Database) -> None:
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=30)
    task, _ = await tasks.create(ALICE, NEW)
    held = await dispatch.claim("agent-1", ["echo"])
    assert held is not None
    cancelled = await tasks.cancel(ALICE, task.task_id)
    assert cancelled.status == "cancelled" and cancelled.assigned_agent == "agent-1"
    late = await dispatch.complete(
        task.task_id, "agent-1", held.attempt_token or "", result={"x": 1}, error=None
    )
    assert not late.accepted
    renewed, lost = await dispatch.renew("agent-1", [task.task_id])
    assert renewed == [] and lost == [task.task_id]


async def test_an_outcome_leases_the_agents_next_task_with_it(db: Database) -> None:
    """complete(claim_next=...) records the outcome and leases the agent's next task in one
    transaction, in queue order and by capability; a refused outcome claims nothing."""
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=30)
    first, _ = await tasks.create(ALICE, NEW)
    await tasks.create(ALICE, replace(NEW, type="code_review", priority=9))  # not for echo
    low, _ = await tasks.create(ALICE, replace(NEW, priority=2))
    high, _ = await tasks.create(ALICE, replace(NEW, priority=8))
    held = await dispatch.claim("agent-1", ["echo"])
    assert held is not None and held.task_id == high.task_id

    done = await dispatch.complete(
        high.task_id,
        "agent-1",
        held.attempt_token or "",
        result={},
        error=None,
        claim_next=["echo"],
    )
    assert done.accepted and done.status == "completed"
    assert done.next is not None and done.next.task_id == first.task_id
    assert done.next.status == "assigned" and done.next.assigned_agent == "agent-1"
    assert done.next.attempt == 1 and done.next.attempt_token
    stored = await dispatch.get(first.task_id)
    assert stored.status == "assigned" and stored.attempt_token == done.next.attempt_token

    # A late outcome of an attempt no longer current: refused, and the queue is untouched.
    late = await dispatch.complete(
        high.task_id, "agent-2", "not-the-token", result={}, error=None, claim_next=["echo"]
    )
    assert not late.accepted and late.next is None
    assert (await dispatch.get(low.task_id)).status == "queued"

    # Without claim_next nothing more is leased; with it and nothing left, next is None.
    plain = await dispatch.complete(
        first.task_id, "agent-1", done.next.attempt_token or "", result={}, error=None
    )
    assert plain.accepted and plain.next is None
    assert (await dispatch.get(low.task_id)).status == "queued"
    last = await dispatch.claim("agent-1", ["echo"])
    assert last is not None and last.task_id == low.task_id
    empty = await dispatch.complete(
        low.task_id, "agent-1", last.attempt_token or "", result={}, error=None, claim_next=["echo"]
    )
    assert empty.accepted and empty.next is None


async def test_claim_next_must_be_for_the_reporting_agent(db: Database) -> None:
    """TasksInternalService.CompleteTask refuses a claim_next naming another agent, before it
    records anything: one agent's outcome must not lease work to another."""
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=30)
    service = TasksInternalService(
        dispatch=dispatch,
        agents=Agents(InternalChannel(address=lambda: "127.0.0.1:1", internal_token="unused")),
    )
    task, _ = await tasks.create(ALICE, NEW)
    await tasks.create(ALICE, NEW)
    held = await dispatch.claim("agent-1", ["echo"])
    assert held is not None
    request = tasks_pb2.TasksInternalServiceCompleteTaskRequest(
        task_id=task.task_id,
        agent_id="agent-1",
        attempt_token=held.attempt_token or "",
        claim_next=tasks_pb2.ClaimTaskRequest(
            agent_id="agent-2", capabilities=["echo"], free_capacity=1
        ),
    )
    request.result.update({"ok": True})
    with pytest.raises(ValidationError) as refused:
        await service.CompleteTask(request, None)
    assert refused.value.details == {"field": "claim_next.agent_id"}
    assert (await dispatch.get(task.task_id)).status == "assigned"

    request.claim_next.agent_id = "agent-1"
    reply = await service.CompleteTask(request, None)
    assert reply.task.status == "completed"
    assert reply.next.task.task_id != task.task_id and reply.next.attempt_token
    assert (await dispatch.get(reply.next.task.task_id)).assigned_agent == "agent-1"


async def test_a_stale_attempt_of_the_same_agent_is_refused(db: Database) -> None:
    """The fencing token, not the agent, decides: an agent that lost its lease and was given
    the task again cannot complete the new attempt with the old attempt's token."""
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=0.2)
    task, _ = await tasks.create(ALICE, NEW)
    first = await dispatch.claim("agent-1", ["echo"])
    assert first is not None
    await asyncio.sleep(0.3)
    await dispatch.expire_leases()
    second = await dispatch.claim("agent-1", ["echo"])
    assert second is not None and second.attempt == 2
    for outcome in ({"result": {"late": True}, "error": None}, {"result": None, "error": None}):
        late = await dispatch.complete(
            task.task_id, "agent-1", first.attempt_token or "", **outcome
        )
        assert not late.accepted and late.reason == "CONFLICT"
    current = await dispatch.get(task.task_id)
    assert current.status == "assigned" and current.attempt_token == second.attempt_token
    done = await dispatch.complete(
        task.task_id, "agent-1", second.attempt_token or "", result={"ok": 1}, error=None
    )
    assert done.accepted and done.task is not None and done.task.result == {"ok": 1}


async def test_a_lease_sweep_leaves_a_task_being_completed_alone(db: Database) -> None:
    """The lease runs out while the holder's result is being written: the sweep must not
    requeue the task over the completion. (On PostgreSQL a sweep reading without row locks
    overwrote it once the completing transaction committed.)"""
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=0.1)
    task, _ = await tasks.create(ALICE, NEW)
    held = await dispatch.claim("agent-1", ["echo"])
    assert held is not None
    await asyncio.sleep(0.2)  # the lease has run out; no sweep yet
    async with db.write() as s, s.begin():
        completing = await TaskStore(s).get(task.task_id, lock=True)
        assert completing is not None and completing.status == "assigned"
        completing.status, completing.result = "completed", {"ok": True}
        sweep = asyncio.create_task(dispatch.expire_leases())
        await asyncio.sleep(0.3)  # the sweep runs while the completion is uncommitted
    lost = await sweep
    assert lost == []
    final = await dispatch.get(task.task_id)
    assert final.status == "completed" and final.result == {"ok": True} and final.attempt == 1


async def test_only_an_attempt_ended_by_the_call_leases_the_next_task(db: Database) -> None:
    """claim_next is acted on when this call ended the attempt with a completion or a
    failure. Not for a repeat of the recorded outcome (its slot was refilled by the first
    call), and not when a retryable error queues the task again: that task must not go
    straight back to the agent that failed it, nor may another be leased to an agent that
    may be stopping."""
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=30)
    for n in range(4):
        await tasks.create(ALICE, replace(NEW, description=f"task {n}", max_attempts=3))
    held = await dispatch.claim("agent-1", ["echo"])
    assert held is not None
    token = held.attempt_token or ""

    retry = await dispatch.complete(
        held.task_id,
        "agent-1",
        token,
        result=None,
        error=("BUSY", "later", True),
        claim_next=["echo"],
    )
    assert retry.accepted and retry.status == "queued" and retry.next is None

    again = await dispatch.claim("agent-1", ["echo"])
    assert again is not None  # the retried task, still first in line: first in, first out
    done = await dispatch.complete(
        again.task_id,
        "agent-1",
        again.attempt_token or "",
        result={},
        error=None,
        claim_next=["echo"],
    )
    assert done.next is not None
    repeat = await dispatch.complete(
        again.task_id,
        "agent-1",
        again.attempt_token or "",
        result={},
        error=None,
        claim_next=["echo"],
    )
    assert repeat.accepted and repeat.status == "completed" and repeat.next is None

    failed = await dispatch.complete(
        done.next.task_id,
        "agent-1",
        done.next.attempt_token or "",
        result=None,
        error=("VALIDATION_ERROR", "cannot", False),
        claim_next=["echo"],
    )
    assert failed.status == "failed" and failed.next is not None  # the agent is free again


async def test_a_late_result_after_the_last_lease_ran_out_is_refused(db: Database) -> None:
    """A task failed by the mesh (its last lease ran out) keeps no attempt token: the late
    result of that attempt is refused, not taken for a repeat of a recorded outcome."""
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=0.1)
    task, _ = await tasks.create(ALICE, replace(NEW, max_attempts=1))
    held = await dispatch.claim("agent-1", ["echo"])
    assert held is not None
    await asyncio.sleep(0.2)
    lost = await dispatch.expire_leases()
    assert [(x.task_id, x.requeued, x.attempt_token) for x in lost] == [
        (task.task_id, False, held.attempt_token)
    ]
    late = await dispatch.complete(
        task.task_id, "agent-1", held.attempt_token or "", result={"late": 1}, error=None
    )
    assert not late.accepted and late.reason == "CONFLICT"
    final = await dispatch.get(task.task_id)
    assert final.status == "failed" and final.error_code == "LEASE_EXPIRED" and final.result is None


async def test_a_lease_never_delivered_goes_back_without_counting_the_attempt(
    db: Database,
) -> None:
    """The agents service hands back a lease whose assignment never reached its agent: the
    task is queued again as if the attempt had not been made, and that attempt's token is
    refused from then on. An attempt that is no longer held, or that the agent has reported
    on, stays as it is."""
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=30)
    task, _ = await tasks.create(ALICE, NEW)
    held = await dispatch.claim("agent-1", ["echo"])
    assert held is not None and held.attempt == 1
    token = held.attempt_token or ""

    assert await dispatch.give_back(task.task_id, "agent-1", "another-token") is None
    assert await dispatch.give_back(task.task_id, "agent-2", token) is None
    back = await dispatch.give_back(task.task_id, "agent-1", token)
    assert back is not None and (back.status, back.attempt, back.assigned_agent) == (
        "queued",
        0,
        "",
    )
    assert await dispatch.give_back(task.task_id, "agent-1", token) is None  # once
    late = await dispatch.complete(task.task_id, "agent-1", token, result={}, error=None)
    assert not late.accepted and late.reason == "CONFLICT"

    again = await dispatch.claim("agent-1", ["echo"])
    assert again is not None and again.task_id == task.task_id and again.attempt == 1
    assert again.attempt_token != token
    await dispatch.progress(task.task_id, "agent-1", again.attempt_token or "", 10, "begun")
    assert await dispatch.give_back(task.task_id, "agent-1", again.attempt_token or "") is None
    assert (await dispatch.get(task.task_id)).status == "running"


async def test_return_task_checks_its_ids(db: Database) -> None:
    service = TasksInternalService(
        dispatch=Dispatch(db=db, lease_seconds=30),
        agents=Agents(InternalChannel(address=lambda: "127.0.0.1:1", internal_token="unused")),
    )
    for request, field in (
        (tasks_pb2.ReturnTaskRequest(agent_id="agent-1", attempt_token="t"), "task_id"),
        (tasks_pb2.ReturnTaskRequest(task_id="x" * 65, agent_id="agent-1"), "task_id"),
        (tasks_pb2.ReturnTaskRequest(task_id="some-task", attempt_token="t"), "agent_id"),
    ):
        with pytest.raises(ValidationError) as refused:
            await service.ReturnTask(request, None)
        assert refused.value.details == {"field": field}
    unknown = tasks_pb2.ReturnTaskRequest(task_id="unknown", agent_id="agent-1", attempt_token="t")
    assert not (await service.ReturnTask(unknown, None)).returned


async def test_an_attempt_past_its_time_limit_fails_the_task(db: Database) -> None:
    """The limit counts from the lease, renewals do not move it, and the task fails at once
    (no other attempt) with TASK_TIMEOUT; the holder's late result is refused."""
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=30)
    slow, _ = await tasks.create(ALICE, replace(NEW, timeout_seconds=1))
    quick, _ = await tasks.create(ALICE, replace(NEW, timeout_seconds=60))
    assert slow.timeout_seconds == 1
    held = [await dispatch.claim("agent-1", ["echo"]) for _ in range(2)]
    assert all(t is not None for t in held)
    token = {t.task_id: t.attempt_token or "" for t in held if t is not None}
    await dispatch.progress(slow.task_id, "agent-1", token[slow.task_id], 10, "")
    assert await dispatch.expire_leases() == []  # not yet
    await asyncio.sleep(0.6)
    renewed, gone = await dispatch.renew("agent-1", [slow.task_id, quick.task_id])
    assert sorted(renewed) == sorted([slow.task_id, quick.task_id]) and gone == []
    await asyncio.sleep(0.5)
    lost = await dispatch.expire_leases()
    assert [(x.task_id, x.agent_id, x.requeued, x.reason) for x in lost] == [
        (slow.task_id, "agent-1", False, "TASK_TIMEOUT")
    ]
    assert lost[0].attempt_token == token[slow.task_id]
    failed = await tasks.get(ALICE, slow.task_id)
    assert failed.status == "failed" and failed.error_code == "TASK_TIMEOUT"
    assert failed.attempt == 1 and "time limit of 1 s" in failed.error
    assert failed.completed_at is not None and failed.attempt_token is None
    late = await dispatch.complete(
        slow.task_id, "agent-1", token[slow.task_id], result={"x": 1}, error=None
    )
    assert not late.accepted and late.reason == "CONFLICT"
    # The other task, within its limit, is untouched and completes.
    assert (await tasks.get(ALICE, quick.task_id)).status == "assigned"
    done = await dispatch.complete(
        quick.task_id, "agent-1", token[quick.task_id], result={}, error=None
    )
    assert done.accepted and done.status == "completed"
    assert await dispatch.expire_leases() == []


async def test_a_task_without_a_limit_asked_gets_the_default(db: Database) -> None:
    task, _ = await Tasks(db=db, timeout_seconds=90).create(ALICE, NEW)
    assert task.timeout_seconds == 90
    for bad in (0, -1, 7 * 24 * 3600 + 1):
        with pytest.raises(ValidationError) as refused:
            await Tasks(db=db).create(ALICE, replace(NEW, timeout_seconds=bad))
        assert refused.value.details["field"] == "timeout_seconds"


async def test_what_each_agent_finished_and_what_it_holds(db: Database) -> None:
    """GetAgentFigures (the agents' metrics) counts the tasks whose last attempt an agent ran
    and that ended; ListHeldTasks gives an agent's current attempts with their tokens."""
    tasks, dispatch = Tasks(db=db), Dispatch(db=db, lease_seconds=30)
    service = TasksInternalService(
        dispatch=dispatch,
        agents=Agents(InternalChannel(address=lambda: "127.0.0.1:1", internal_token="unused")),
    )
    for _ in range(4):
        await tasks.create(ALICE, replace(NEW, max_attempts=1))
    held = [await dispatch.claim("agent-1", ["echo"]) for _ in range(3)]
    other = await dispatch.claim("agent-2", ["echo"])
    assert all(t is not None for t in [*held, other])
    for task in held[:2]:
        assert task is not None
        await asyncio.sleep(0.05)
        await dispatch.complete(
            task.task_id, "agent-1", task.attempt_token or "", result={}, error=None
        )
    assert held[2] is not None and other is not None
    await dispatch.complete(
        held[2].task_id, "agent-1", held[2].attempt_token or "",
        result=None, error=("BROKEN", "it broke", False),
    )  # fmt: skip
    request = tasks_pb2.GetAgentFiguresRequest(agent_ids=["agent-1", "agent-2", "agent-3"])
    reply = await service.GetAgentFigures(request, None)
    assert [(f.agent_id, f.completed, f.failed) for f in reply.figures] == [("agent-1", 2, 1)]
    assert 0.04 <= reply.figures[0].average_duration < 5
    holding = await service.ListHeldTasks(tasks_pb2.ListHeldTasksRequest(agent_id="agent-2"), None)
    assert [(a.task.task_id, a.attempt_token) for a in holding.assignments] == [
        (other.task_id, other.attempt_token)
    ]
    with pytest.raises(ValidationError):
        await service.GetAgentFigures(
            tasks_pb2.GetAgentFiguresRequest(agent_ids=[f"a-{n}" for n in range(101)]), None
        )
