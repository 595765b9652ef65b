"""What a Connect agent may send and what it is owed: its held work repeated on reconnection
and counted against its capacity, attempts named by their tokens, malformed outcomes refused
in the stream, never a crash."""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from agentmesh.v1 import agents_pb2, agents_pb2_grpc, tasks_pb2
from servers.agents.service import agent_id_of
from servers.launcher import MeshProcess
from tests.conftest import SHARED_MESH_ENV
from tests.e2e.test_agent_registry import StreamAgent, agent_events
from tests.e2e.test_agents import FAST, Owner

QUIET = 1.5  # seconds in which no frame of a kind must come


async def _none(agent: StreamAgent, kind: str) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(QUIET):
            await agent.next(kind)


@contextlib.asynccontextmanager
async def _holding(
    mesh: MeshProcess, name: str
) -> AsyncIterator[tuple[Owner, StreamAgent, dict[str, Any], agents_pb2.Assignment]]:
    """An owner, its agent of capacity 1 on a Connect stream, a task and the agent's
    assignment of it; the stream closes afterwards."""
    owner = Owner(mesh)
    capability = f"{name[:8]}_{secrets.token_hex(4)}"
    agent = StreamAgent(mesh, owner.key, name, capability, capacity=1)
    try:
        task = owner.create(type=capability, description="x")
        held = (await agent.next("assignment")).assignment
        yield owner, agent, task, held
    finally:
        await agent.close()


async def test_a_reconnecting_agent_gets_its_held_work_first_and_no_more_than_its_capacity(
    mesh: MeshProcess,
) -> None:
    owner = Owner(mesh)
    capability = f"rc_{secrets.token_hex(4)}"
    first = StreamAgent(mesh, owner.key, "steady", capability, capacity=1)
    owner.create(type=capability, description="held")
    held = (await first.next("assignment")).assignment
    waiting = owner.create(type=capability, description="waits for the slot")
    # The agent reconnects before its old stream is seen to end (a cut connection is noticed
    # only by keepalive): the new stream replaces the old one, which releases nothing.
    again = StreamAgent(mesh, owner.key, "steady", capability, capacity=1)
    try:
        assert (await first.next("end")).end.reason == "REPLACED"
        assert (await again.next("welcome")).welcome.agent_id == agent_id_of(owner.id, "steady")
        repeated = (await again.next("assignment")).assignment
        assert repeated.task.task_id == held.task.task_id
        assert repeated.attempt_token == held.attempt_token and repeated.attempt == 1
        await _none(again, "assignment")  # its one slot is taken by the held task
        assert owner.task(waiting["task_id"])["status"] == "queued"
        # Its outcome frees the slot, and the waiting task follows.
        result = agents_pb2.TaskResult(
            task_id=repeated.task.task_id, attempt_token=repeated.attempt_token
        )
        result.result.update({"ok": True})
        again.send(agents_pb2.ConnectRequest(result=result))
        assert (await again.next("result_ack")).result_ack.accepted
        assert (await again.next("assignment")).assignment.task.task_id == waiting["task_id"]
    finally:
        await first.close()
        await again.close()


async def test_progress_names_its_attempt(mesh: MeshProcess) -> None:
    """Progress without a token is ignored: it frees no slot and stops nothing. Progress with
    a stale token is answered with a Cancellation of that attempt only."""
    async with _holding(mesh, "reporter") as (owner, agent, task, held):
        owner.create(type=task["type"], description="two")
        agent.send(
            agents_pb2.ConnectRequest(
                progress=agents_pb2.TaskProgress(task_id=task["task_id"], progress=10)
            )
        )
        await _none(agent, "assignment")
        await _none(agent, "cancellation")
        stale = "00000000-0000-0000-0000-000000000000"
        agent.send(
            agents_pb2.ConnectRequest(
                progress=agents_pb2.TaskProgress(
                    task_id=task["task_id"], attempt_token=stale, progress=20
                )
            )
        )
        cancelled = (await agent.next("cancellation")).cancellation
        assert (cancelled.task_id, cancelled.attempt_token) == (task["task_id"], stale)
        assert owner.task(task["task_id"])["status"] == "assigned"
        assert held.attempt_token != stale


async def test_malformed_outcomes_are_refused_in_the_stream(mesh: MeshProcess) -> None:
    async with _holding(mesh, "sloppy") as (owner, agent, task, held):
        bad_results = []
        bare = agents_pb2.TaskResult(task_id=task["task_id"], attempt_token=held.attempt_token)
        bad_results.append(bare)  # neither a result nor an error
        infinite = agents_pb2.TaskResult(task_id=task["task_id"], attempt_token=held.attempt_token)
        infinite.result.update({"score": math.inf})
        bad_results.append(infinite)
        lowercase = agents_pb2.TaskResult(
            task_id=task["task_id"],
            attempt_token=held.attempt_token,
            error=tasks_pb2.TaskError(code="not upper", message=""),
        )
        bad_results.append(lowercase)
        for bad in bad_results:
            agent.send(agents_pb2.ConnectRequest(result=bad))
            ack = (await agent.next("result_ack")).result_ack
            assert (ack.accepted, ack.reason) == (False, "VALIDATION_ERROR")
        assert owner.task(task["task_id"])["status"] == "assigned"


async def test_a_hello_with_a_number_json_cannot_hold_is_a_validation_error(
    mesh: MeshProcess,
) -> None:
    owner = Owner(mesh)
    hello = agents_pb2.Hello(name="nan-config", capabilities=["x"])
    hello.configuration.update({"temperature": math.nan})

    async def frames() -> AsyncIterator[agents_pb2.ConnectRequest]:
        yield agents_pb2.ConnectRequest(hello=hello)
        await asyncio.sleep(10)

    async with grpc.aio.insecure_channel(mesh.url.removeprefix("http://")) as channel:
        call = agents_pb2_grpc.AgentsServiceStub(channel).Connect(
            frames(), metadata=(("authorization", f"Bearer {owner.key}"),)
        )
        async with asyncio.timeout(10):
            replies = [frame async for frame in call]
    assert [r.WhichOneof("kind") for r in replies] == ["error"]
    assert replies[0].error.code == "VALIDATION_ERROR"
    assert "NaN or Infinity" in replies[0].error.message


async def test_a_malformed_heartbeat_ends_the_stream(mesh: MeshProcess) -> None:
    """Connect heartbeats have REST's limits: a negative load, thousands of task ids or ids of
    100,000 characters (which would be echoed back in cancellations) are refused."""
    owner = Owner(mesh)
    for heartbeat in (
        agents_pb2.AgentHeartbeat(current_load=-5),
        agents_pb2.AgentHeartbeat(task_ids=[f"t-{n}" for n in range(5000)]),
        agents_pb2.AgentHeartbeat(task_ids=["x" * 100_000]),
    ):
        agent = StreamAgent(mesh, owner.key, f"hb-{secrets.token_hex(3)}", "hb_probe")
        try:
            await agent.next("welcome")
            agent.send(agents_pb2.ConnectRequest(heartbeat=heartbeat))
            async with asyncio.timeout(10):
                error = (await agent.next("error")).error
            assert error.code == "VALIDATION_ERROR", error
        finally:
            await agent.close()


async def test_a_frame_with_a_nul_character_ends_the_stream(mesh: MeshProcess) -> None:
    """No text field of any RPC may hold a NUL (PostgreSQL's text cannot): a frame with one is
    refused like one that does not decode, naming the field; the SDK replaces NULs in the
    messages it sends (tests/agent/test_handlers.py)."""
    async with _holding(mesh, "nul-sender") as (owner, agent, task, held):
        agent.send(
            agents_pb2.ConnectRequest(
                progress=agents_pb2.TaskProgress(
                    task_id=task["task_id"],
                    attempt_token=held.attempt_token,
                    progress=5,
                    message="half\x00way",
                )
            )
        )
        async with asyncio.timeout(10):
            error = (await agent.next("error")).error
        assert error.code == "VALIDATION_ERROR"
        assert error.message == "progress.message must not contain NUL characters"


async def test_a_flood_of_progress_is_paced_and_its_last_word_kept(mesh: MeshProcess) -> None:
    """A Connect stream is one call, whatever its frames: 300 progress frames sent at once
    would be 300 write transactions and 300 events on the bus all users share. They are paced
    to the reference agent's rate (5 a second per slot of capacity, bursts of twice that), a
    later frame of a task replacing one that waits, and the last one is forwarded when the
    budget allows (here at the next heartbeat): the task ends up at the last word sent."""
    async with _holding(mesh, "chatty") as (owner, agent, task, held):
        started = asyncio.get_running_loop().time()
        for n in range(1, 301):
            agent.send(
                agents_pb2.ConnectRequest(
                    progress=agents_pb2.TaskProgress(
                        task_id=task["task_id"],
                        attempt_token=held.attempt_token,
                        progress=n // 4,
                        message=f"step {n}",
                    )
                )
            )
        await asyncio.sleep(1.0)
        agent.send(
            agents_pb2.ConnectRequest(
                heartbeat=agents_pb2.AgentHeartbeat(task_ids=[task["task_id"]], current_load=1)
            )
        )
        elapsed = asyncio.get_running_loop().time() - started
        events: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while not events or events[-1]["data"]["message"] != "step 300":
                await asyncio.sleep(0.1)
                listed = httpx.get(
                    f"{mesh.url}/api/v1/events",
                    params={"patterns": "task.progress", "limit": 100},
                    headers=owner.headers,
                )
                events = [e for e in listed.json()["events"] if e["subject_id"] == task["task_id"]]
        assert len(events) <= 10 + 5 * (elapsed + 1) + 1, len(events)
        assert owner.task(task["task_id"])["progress"] == 75


async def test_a_held_task_its_agent_stops_listing_goes_to_another_attempt(
    tmp_path: Path,
) -> None:
    """A Connect heartbeat renews the tasks it lists (and those handed out too recently to be
    listed), not every task the stream was given: a task the agent has dropped runs out its
    lease, is cancelled there (LEASE_LOST) and comes back as attempt 2, instead of taking the
    agent's one slot until its time limit (an hour by default)."""
    with MeshProcess(data_dir=tmp_path / "mesh", env=FAST) as mesh:  # lease 3 s, heartbeat 1 s
        async with _holding(mesh, "forgetful") as (owner, agent, task, held):
            listed = [task["task_id"]]

            async def beat() -> None:
                while True:
                    heartbeat = agents_pb2.AgentHeartbeat(task_ids=listed, current_load=1)
                    heartbeat.heartbeat.time.GetCurrentTime()
                    agent.send(agents_pb2.ConnectRequest(heartbeat=heartbeat))
                    await asyncio.sleep(0.5)

            beating = asyncio.create_task(beat())
            try:
                # Listed, it is kept well past its lease and the grace of two intervals.
                for _ in range(5):  # 7.5 s
                    await _none(agent, "cancellation")
                kept = owner.task(task["task_id"])
                assert (kept["status"], kept["attempt"]) == ("assigned", 1)
                # Left out, it is not.
                listed.clear()
                async with asyncio.timeout(15):
                    cancelled = (await agent.next("cancellation")).cancellation
                assert (cancelled.task_id, cancelled.reason) == (task["task_id"], "LEASE_LOST")
                assert cancelled.attempt_token == held.attempt_token
                again = (await agent.next("assignment")).assignment
                assert (again.task.task_id, again.attempt) == (task["task_id"], 2)
                assert again.attempt_token != held.attempt_token
            finally:
                beating.cancel()


async def test_an_agent_that_stops_reading_is_cut_and_comes_back_up_to_date(
    tmp_path: Path,
) -> None:
    """An agent that heartbeats but does not read its stream: configuration updates pile up
    (1,000 frames wait) and the stream is cut: `agent.offline` says NOT_READING at once; the
    agent, reading again, gets what was on its way, then RESOURCE_EXHAUSTED; reconnecting, its
    Welcome has the latest configuration. Before, the stream went on with updates dropped and
    no more work."""
    env = {**SHARED_MESH_ENV, "AGENTMESH_QUOTAS": "general=0,agent=0,management=0"}
    with MeshProcess(data_dir=tmp_path, env=env) as mesh:
        owner = Owner(mesh)
        name, capability = "deaf", f"deaf_{secrets.token_hex(4)}"
        channel = grpc.aio.insecure_channel(mesh.url.removeprefix("http://"))
        up: asyncio.Queue[agents_pb2.ConnectRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[agents_pb2.ConnectRequest]:
            while (item := await up.get()) is not None:
                yield item

        hello = agents_pb2.Hello(name=name, capabilities=[capability], max_capacity=1)
        up.put_nowait(agents_pb2.ConnectRequest(hello=hello))
        call = agents_pb2_grpc.AgentsServiceStub(channel).Connect(
            requests(), metadata=(("authorization", f"Bearer {owner.key}"),)
        )

        async def heartbeats() -> None:
            while True:
                up.put_nowait(agents_pb2.ConnectRequest(heartbeat=agents_pb2.AgentHeartbeat()))
                await asyncio.sleep(0.5)

        beating = asyncio.ensure_future(heartbeats())
        try:
            agent_id = (await call.read()).welcome.agent_id
            url = f"{mesh.url}/api/v1/agents/{agent_id}/config"
            async with httpx.AsyncClient(headers=owner.headers, timeout=30) as client:
                big = await client.patch(url, json={"big": "x" * 60_000})
                assert big.status_code == 200, big.text
                sent = iter(range(1200))

                async def patcher() -> None:
                    for n in sent:
                        reply = await client.patch(url, json={"n": n})
                        assert reply.status_code == 200, reply.text

                await asyncio.gather(*(patcher() for _ in range(8)))
                stored = (await client.get(f"{mesh.url}/api/v1/agents/{agent_id}")).json()
            # Still not reading, it is already gone on the server: the stream's task is
            # cancelled a moment after its abort, and the stream's end recorded.
            async with asyncio.timeout(10):
                while not (
                    offline := [
                        d for k, _, d in agent_events(mesh, agent_id) if k == "agent.offline"
                    ]
                ):
                    await asyncio.sleep(0.1)
            assert [d["reason"] for d in offline] == ["NOT_READING"]
            # Now it reads: what was on its way, then the cut.
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                async with asyncio.timeout(30):
                    while (frame := await call.read()) is not grpc.aio.EOF:
                        if frame.HasField("ping"):
                            pong = agents_pb2.Pong(nonce=frame.ping.nonce)
                            up.put_nowait(agents_pb2.ConnectRequest(pong=pong))
            assert cut.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, cut.value
        finally:
            beating.cancel()
            up.put_nowait(None)
            call.cancel()
            await channel.close()
        again = StreamAgent(mesh, owner.key, name, capability, capacity=1)
        try:
            welcome = (await again.next("welcome")).welcome
            assert welcome.agent_id == agent_id
            # The last PATCH stored (eight ran at once), which the agent never read.
            assert welcome.configuration["n"] == stored["configuration"]["n"] >= 1000
        finally:
            await again.close()
