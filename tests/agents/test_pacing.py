"""servers/agents/pacing.py: what one Connect stream's frames may cost."""

from __future__ import annotations

import time

from agentmesh.v1 import agents_pb2
from servers.agents.pacing import Pacer


def _frame(task_id: str, n: int) -> agents_pb2.TaskProgress:
    return agents_pb2.TaskProgress(task_id=task_id, attempt_token="t", progress=n)


def test_progress_past_the_burst_waits_and_the_latest_word_wins() -> None:
    pacer = Pacer(capacity=1, heartbeat_seconds=10)  # 5 a second, bursts of 10
    forwarded = [f for n in range(10) for f in pacer.progress(_frame("a", n))]
    assert [f.progress for f in forwarded] == list(range(10))
    assert pacer.progress(_frame("a", 10)) == []
    assert pacer.progress(_frame("b", 1)) == []
    assert pacer.progress(_frame("a", 11)) == []  # replaces a's 10, now behind b
    time.sleep(0.45)  # two frames' worth
    assert [(f.task_id, f.progress) for f in pacer.due()] == [("b", 1), ("a", 11)]
    assert pacer.due() == []


def test_a_tasks_outcome_drops_its_waiting_progress() -> None:
    pacer = Pacer(capacity=1, heartbeat_seconds=10)
    for n in range(10):
        pacer.progress(_frame("a", n))
    assert pacer.progress(_frame("a", 99)) == []
    pacer.ended("a")
    time.sleep(0.25)
    assert pacer.due() == []


def test_heartbeats_renew_at_most_once_per_half_interval() -> None:
    pacer = Pacer(capacity=4, heartbeat_seconds=0.2)
    assert pacer.may_renew()
    assert not pacer.may_renew()
    time.sleep(0.11)
    assert pacer.may_renew()
