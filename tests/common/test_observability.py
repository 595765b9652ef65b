"""The process's record behind seed 001's observability endpoints (observability.py)."""

from __future__ import annotations

from sqlalchemy import text

from servers.common.db import Database
from servers.common.observability import IN_FLIGHT, OBSERVED, Observed, trace_id_of

RID = "0b5e7c7e-2f4a-4c39-9a51-1d2e3f405162"


def test_a_trace_id_is_the_callers_or_the_request_id() -> None:
    given = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id_of(f"00-{given}-00f067aa0ba902b7-01", RID) == given
    assert trace_id_of(f" 00-{given.upper()}-00f067aa0ba902b7-01 ", RID) == given
    for bad in ("", "garbage", f"00-{'0' * 32}-00f067aa0ba902b7-01", f"00-{given}-xyz-01"):
        assert trace_id_of(bad, RID) == RID.replace("-", "")
    fresh = trace_id_of("", "not-a-uuid")
    assert len(fresh) == 32 and int(fresh, 16) >= 0


def test_calls_in_flight_come_first_then_the_latest_ended_within_the_bound() -> None:
    seen = Observed(keep=3)
    caller = ""
    running = seen.begin("/agentmesh.v1.EventsService/StreamEvents", RID, "", lambda: caller)
    for n, status in enumerate(["OK", "NOT_FOUND", "INTERNAL", "OK", "UNAVAILABLE"]):
        seen.end(seen.begin(f"/agentmesh.v1.TasksService/GetTask{n}", RID, ""), status, "u1")
    active = seen.active(10)
    assert [r.method.rsplit("/", 1)[1] for r in active] == [
        "StreamEvents",
        "GetTask4",
        "GetTask3",
        "GetTask2",
    ]
    assert active[0] is running and active[0].status == IN_FLIGHT
    assert active[0].operation == "stream_events" and active[1].user == "u1"
    # A call in flight names its caller once it is known; an ended one, as it ended.
    assert running.user == ""
    caller = "u2"
    assert running.user == "u2"
    assert [r.method for r in seen.active(2)] == [running.method, active[1].method]
    # Every ended call counts, kept or not; only the server's failures are errors.
    assert (seen.calls, seen.server_errors) == (5, 2)
    seen.published("task.created")
    seen.published("agent.online")
    seen.published("task.completed")
    assert seen.events == {"task": 2, "agent": 1}


async def test_every_statement_counts_as_a_database_span(database_url: str) -> None:
    async with Database(database_url) as db:
        before = OBSERVED.statements
        async with db.session() as s:
            for _ in range(3):
                await s.execute(text("SELECT 1"))
        assert OBSERVED.statements - before >= 3
