"""The reference agent's side of its leases (servers/agent/runtime.py): a cancellation of
another attempt leaves the running one alone, and heartbeats list every task it holds. Frames
are fed to the runtime as its stream reader would; no server is needed for these rules."""

from __future__ import annotations

import asyncio
import logging

import pytest

from agentmesh.v1 import agents_pb2, tasks_pb2
from servers.agent.runtime import Agent, Progress


async def test_a_cancellation_of_another_attempt_is_ignored() -> None:
    agent = Agent(name="runner", api_key="amk_test", capabilities=["wait"])
    started = asyncio.Event()

    @agent.handler("wait")
    async def wait(task: tasks_pb2.Task, report: Progress) -> dict[str, object]:
        started.set()
        await asyncio.Event().wait()
        return {}

    task = tasks_pb2.Task(task_id="t1", type="wait")
    agent._assigned(tasks_pb2.Assignment(task=task, attempt=2, attempt_token="attempt-2"))
    await asyncio.wait_for(started.wait(), 5)

    def cancel(token: str) -> None:
        agent._cancelled(
            agents_pb2.Cancellation(task_id="t1", reason="LEASE_LOST", attempt_token=token)
        )

    cancel("attempt-1")  # the attempt before: not this one
    assert agent.running_task_ids == ["t1"]
    cancel("attempt-2")
    assert agent.running_task_ids == []

    agent._assigned(tasks_pb2.Assignment(task=task, attempt=3, attempt_token="attempt-3"))
    assert agent.running_task_ids == ["t1"]
    cancel("")  # no token: whatever attempt runs
    assert agent.running_task_ids == []
    await asyncio.sleep(0)
    await asyncio.gather(*agent._tasks, return_exceptions=True)


async def test_heartbeats_list_every_task_held_until_its_outcome_is_acknowledged() -> None:
    """The server renews only the leases a heartbeat lists: a task waiting for a slot, and one
    whose outcome is on its way, are still held."""
    agent = Agent(name="runner", api_key="amk_test", capabilities=["wait"], capacity=1)
    release = asyncio.Event()

    @agent.handler("wait")
    async def wait(task: tasks_pb2.Task, report: Progress) -> dict[str, object]:
        await release.wait()
        return {}

    for n in (1, 2):  # the second waits for the one slot
        task = tasks_pb2.Task(task_id=f"t{n}", type="wait")
        agent._assigned(tasks_pb2.Assignment(task=task, attempt=1, attempt_token=f"a{n}"))
    await asyncio.sleep(0.05)
    assert agent.held_task_ids == ["t1", "t2"]
    release.set()
    for _ in range(50):
        if not agent.running_task_ids:
            break
        await asyncio.sleep(0.01)
    assert agent.running_task_ids == []
    assert agent.held_task_ids == ["t1", "t2"]  # outcomes sent, not acknowledged
    agent._acknowledged(agents_pb2.TaskResultAck(task_id="t1", attempt_token="a1", accepted=True))
    assert agent.held_task_ids == ["t2"]
    await asyncio.gather(*agent._tasks, return_exceptions=True)


async def test_a_cancellation_with_the_stoppers_words_is_logged_with_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """StopTask's reason comes as Cancellation.message; logging it under the record's own
    "message" key raised in the stream's reader, which broke the stream on every stop."""
    caplog.set_level(logging.INFO, logger="agentmesh.agent")
    agent = Agent(name="runner", api_key="amk_test", capabilities=["wait"])
    agent._cancelled(
        agents_pb2.Cancellation(task_id="t1", reason="STOPPED", message="budget ran out")
    )
    (record,) = [r for r in caplog.records if r.getMessage() == "task cancelled"]
    assert record.__dict__["stop_message"] == "budget ran out"
