"""Which dispatchers a newly queued task wakes (Registry.wake): one that can take it, so that
the others do not each spend a claim on it, and never one that cannot."""

from __future__ import annotations

import time
from dataclasses import replace

from agentmesh.v1 import agents_pb2, tasks_pb2
from servers.agents.registry import OUTBOX_LIMIT, Registry, Session
from tests.agents.test_directory import session


def _dispatching(name: str, *, capabilities: set[str], capacity: int = 1) -> Session:
    s = replace(session(name, capacity=capacity), capabilities=frozenset(capabilities))
    s.dispatching = True
    return s


def _registry(*sessions: Session, quiet_after: float = 30.0) -> Registry:
    registry = Registry(quiet_after=quiet_after)
    for s in sessions:
        registry.add(s)
    return registry


def _woken(*sessions: Session) -> list[str]:
    return [s.name for s in sessions if s.wake.is_set()]


def test_one_idle_dispatcher_that_can_take_the_task_is_woken() -> None:
    a, b = _dispatching("a", capabilities={"echo"}), _dispatching("b", capabilities={"echo"})
    registry = _registry(a, b)
    registry.wake({"echo"})
    assert len(_woken(a, b)) == 1
    registry.wake({"echo"})  # a second task: the other one
    assert _woken(a, b) == ["a", "b"]


def test_the_one_with_most_room_then_longest_without_work_is_chosen() -> None:
    small = _dispatching("small", capabilities={"echo"}, capacity=1)
    large = _dispatching("large", capabilities={"echo"}, capacity=4)
    _registry(small, large).wake({"echo"})
    assert _woken(small, large) == ["large"]

    recent = _dispatching("recent", capabilities={"echo"})
    recent.last_claimed = time.monotonic()
    rested = _dispatching("rested", capabilities={"echo"})
    rested.last_claimed = time.monotonic() - 60
    _registry(recent, rested).wake({"echo"})
    assert _woken(recent, rested) == ["rested"]


def test_only_dispatchers_that_can_take_it() -> None:
    echo = _dispatching("echo", capabilities={"echo"})
    reviewer = _dispatching("reviewer", capabilities={"code_review", "python"})
    full = _dispatching("full", capabilities={"code_review", "python"}, capacity=1)
    full.held["task-1"] = "token"
    no_stream = replace(session("no-stream"), capabilities=frozenset({"code_review", "python"}))
    quiet = _dispatching("quiet", capabilities={"code_review", "python"})
    quiet.last_seen -= 120
    registry = _registry(echo, reviewer, full, no_stream, quiet)
    registry.wake({"code_review", "python"})  # a task requiring both
    assert _woken(echo, reviewer, full, no_stream, quiet) == ["reviewer"]
    reviewer.wake.clear()
    registry.wake({"python", "rust"})  # nobody has both
    assert _woken(echo, reviewer, full, no_stream, quiet) == []


def test_when_every_able_dispatcher_is_busy_claiming_all_look_again() -> None:
    """A claim that began before the task committed may miss it; waking the claiming
    dispatchers makes each look once more when its claim returns."""
    a, b = _dispatching("a", capabilities={"echo"}), _dispatching("b", capabilities={"echo"})
    a.claiming = True
    b.wake.set()  # woken by an earlier task, not yet running
    registry = _registry(a, b)
    registry.wake({"echo"})
    assert _woken(a, b) == ["a", "b"]


def _assignment(task_id: str) -> tasks_pb2.Assignment:
    return tasks_pb2.Assignment(task=tasks_pb2.Task(task_id=task_id), attempt_token=f"{task_id}-1")


def test_a_heartbeat_renews_what_it_lists_and_what_is_too_new_to_be_listed() -> None:
    s = session()
    for task_id in ("old", "new", "dropped"):
        s.hold(_assignment(task_id))
    s.handed_at["old"] -= 30  # handed out half a minute ago
    s.drop("dropped")
    assert s.to_renew(["listed"], grace=20) == ["listed", "new"]
    # Left out past the grace, a held task is renewed only if listed.
    assert s.to_renew([], grace=20) == ["new"]
    assert s.to_renew(["old"], grace=20) == ["new", "old"]


def test_an_agent_that_stops_reading_has_its_stream_cut_once() -> None:
    """Once OUTBOX_LIMIT frames wait, the next one cannot be queued: the stream is cut (the
    service aborts the call and cancels its writer), so the agent reconnects (its Welcome
    carries the configuration, its held tasks are repeated) instead of the stream going on
    without what was dropped: a configuration update, a cancellation, work."""
    one = session()
    cuts: list[int] = []
    one.cut = lambda: cuts.append(1)
    frame = agents_pb2.ConnectResponse(ping=agents_pb2.Ping(nonce="n"))
    assert all(one.send(frame) for _ in range(OUTBOX_LIMIT))
    assert cuts == [] and not one.overflowed
    assert not one.send(frame) and not one.send(frame)
    assert cuts == [1] and one.overflowed
