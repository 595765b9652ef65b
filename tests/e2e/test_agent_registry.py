"""The agent registry over REST (seed 004's GET /agents, /agents/{id}, PATCH
/agents/{id}/config) and ResolveAgents over gRPC, with a raw Connect stream standing as the
agent: connected agents, agents gone offline, and overrides that outlive a mesh restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from agentmesh.v1 import agents_pb2, agents_pb2_grpc
from servers.common.auth import INTERNAL_HEADER
from servers.launcher import MeshProcess, free_port
from tests.e2e.test_agents import FAST, Owner
from tests.helpers import assert_envelope, error_reason, new_user


class StreamAgent:
    """An agent that only says Hello and records what the server sends it."""

    def __init__(
        self,
        mesh: MeshProcess,
        key: str,
        name: str,
        capability: str = "registry_probe",
        capacity: int = 2,
    ) -> None:
        self._queue: asyncio.Queue[agents_pb2.ConnectRequest | None] = asyncio.Queue()
        self._channel = grpc.aio.insecure_channel(mesh.url.removeprefix("http://"))
        self.frames: asyncio.Queue[agents_pb2.ConnectResponse] = asyncio.Queue()
        # A capability no other test queues work for: on the shared mesh this agent must stay
        # idle (agents serve every owner's tasks).
        hello = agents_pb2.Hello(
            name=name,
            type="specialist",
            capabilities=[capability],
            max_capacity=capacity,
            version="test",
        )
        hello.configuration.update({"model": "small", "temperature": 0.7})
        self._queue.put_nowait(agents_pb2.ConnectRequest(hello=hello))
        self._call = agents_pb2_grpc.AgentsServiceStub(self._channel).Connect(
            self._requests(), metadata=(("authorization", f"Bearer {key}"),)
        )
        self._reader = asyncio.ensure_future(self._read())

    async def _requests(self) -> AsyncIterator[agents_pb2.ConnectRequest]:
        while (item := await self._queue.get()) is not None:
            yield item

    async def _read(self) -> None:
        async for frame in self._call:
            if frame.HasField("ping"):  # answered, so that the server keeps the stream
                pong = agents_pb2.Pong(nonce=frame.ping.nonce)
                self._queue.put_nowait(agents_pb2.ConnectRequest(pong=pong))
            await self.frames.put(frame)

    def send(self, request: agents_pb2.ConnectRequest) -> None:
        self._queue.put_nowait(request)

    async def next(self, kind: str) -> agents_pb2.ConnectResponse:
        while True:
            frame = await asyncio.wait_for(self.frames.get(), 10)
            if frame.WhichOneof("kind") == kind:
                return frame

    async def close(self) -> None:
        self._queue.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self._channel.close()


async def test_connected_agents_are_listed_got_and_configured(mesh: MeshProcess) -> None:
    owner = Owner(mesh)
    agent = StreamAgent(mesh, owner.key, "reviewer")
    try:
        agent_id = (await agent.next("welcome")).welcome.agent_id
        async with httpx.AsyncClient(base_url=mesh.url, headers=owner.headers) as client:
            listed = (await client.get("/api/v1/agents")).json()
            assert [a["agent_id"] for a in listed["agents"]] == [agent_id]
            assert (listed["total"], listed["active"], listed["idle"], listed["busy"]) == (
                1,
                1,
                1,
                0,
            )
            one = (await client.get(f"/api/v1/agents/{agent_id}")).json()
            assert one["name"] == "reviewer" and one["status"] == "idle"
            assert one["capabilities"] == ["registry_probe"] and one["max_capacity"] == 2
            assert one["configuration"] == {"model": "small", "temperature": 0.7}
            assert one["health"]["status"] == "healthy"
            filtered = await client.get("/api/v1/agents", params={"capabilities": "python"})
            assert filtered.json()["total"] == 0

            patched = await client.patch(
                f"/api/v1/agents/{agent_id}/config",
                json={"temperature": 0.8, "max_iterations": 5},
            )
            assert patched.status_code == 200, patched.text
            assert patched.json()["updated_fields"] == ["max_iterations", "temperature"]
            assert patched.json()["configuration"] == {
                "model": "small",
                "temperature": 0.8,
                "max_iterations": 5,
            }
            # The connected agent hears of it at once.
            update = (await agent.next("config_update")).config_update
            assert update.configuration["temperature"] == 0.8
            # With a mask, a listed key absent from the body is removed.
            masked = await client.patch(
                f"/api/v1/agents/{agent_id}/config",
                params={"update_mask": "model"},
                json={},
            )
            assert masked.json()["configuration"] == {"temperature": 0.8, "max_iterations": 5}

            assert_envelope(
                await client.get("/api/v1/agents", params={"limit": 101}), 400, "VALIDATION_ERROR"
            )
            assert_envelope(
                await client.get("/api/v1/agents", params={"status": "asleep"}),
                400,
                "VALIDATION_ERROR",
            )
            # A capability filter is a task type: an empty one (which would list nothing) or
            # one no task type could be is refused, as are more than an agent may have.
            for capabilities in ([""], ["code review"], [f"c{n}" for n in range(33)]):
                error = assert_envelope(
                    await client.get("/api/v1/agents", params={"capabilities": capabilities}),
                    400,
                    "VALIDATION_ERROR",
                )
                assert error["details"] == {"field": "capabilities"}, error
            assert_envelope(await client.get("/api/v1/agents/no-such-agent"), 404, "NOT_FOUND")

        # Another developer does not see it; a plain user may not read agents at all.
        other = Owner(mesh)
        async with httpx.AsyncClient(base_url=mesh.url, headers=other.headers) as client:
            assert (await client.get("/api/v1/agents")).json()["total"] == 0
            assert_envelope(await client.get(f"/api/v1/agents/{agent_id}"), 404, "NOT_FOUND")
            denied = await client.patch(f"/api/v1/agents/{agent_id}/config", json={"x": 1})
            assert_envelope(denied, 404, "NOT_FOUND")
        plain = httpx.post(mesh.url + "/api/v1/auth/register", json=new_user()).json()
        reply = httpx.get(
            mesh.url + "/api/v1/agents",
            headers={"Authorization": f"Bearer {plain['access_token']}"},
        )
        assert_envelope(reply, 403, "INSUFFICIENT_PERMISSIONS")
    finally:
        await agent.close()


async def until(check: Any, what: str, timeout: float = 15) -> Any:
    """Polls ``check()`` (a coroutine function) until it answers something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := await check():
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def agent_events(mesh: MeshProcess, agent_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(event_type, owner_id, data) of the agent's events in the agents service's outbox."""
    with sqlite3.connect(mesh.data_dir / "agentmesh.db") as db:
        rows = db.execute(
            "SELECT event_type, owner_id, data FROM agents_outbox WHERE subject_id = ? ORDER BY id",
            (agent_id,),
        ).fetchall()
    return [(kind, owner, json.loads(data)) for kind, owner, data in rows]


def key_id(owner: Owner) -> str:
    reply = httpx.get(owner.mesh.url + "/api/v1/auth/api-keys", headers=owner.headers)
    assert reply.status_code == 200, reply.text
    (key,) = reply.json()["api_keys"]
    return str(key["key_id"])


def resolve(mesh: MeshProcess, **request: Any) -> list[agents_pb2.AgentIdentity]:
    """AgentsInternalService.ResolveAgents, straight to the agents server, as a mesh service."""
    token = (mesh.data_dir / "keys" / "internal-token").read_text().strip()
    with grpc.insecure_channel(mesh.services["agents"]) as channel:
        reply = agents_pb2_grpc.AgentsInternalServiceStub(channel).ResolveAgents(
            agents_pb2.ResolveAgentsRequest(**request),
            metadata=((INTERNAL_HEADER, token),),
            timeout=10,
        )
    return list(reply.agents)


async def test_a_disconnected_agent_is_listed_offline(mesh: MeshProcess) -> None:
    owner = Owner(mesh)
    agent = StreamAgent(mesh, owner.key, "leaver")
    agent_id = (await agent.next("welcome")).welcome.agent_id
    async with httpx.AsyncClient(base_url=mesh.url, headers=owner.headers) as client:
        assert (await client.get(f"/api/v1/agents/{agent_id}")).json()["status"] == "idle"
        await agent.close()

        async def offline() -> dict[str, Any] | None:
            one = (await client.get(f"/api/v1/agents/{agent_id}")).json()
            return one if one["status"] == "offline" else None

        one = await until(offline, "the agent to be listed offline")
        assert one["name"] == "leaver" and one["capabilities"] == ["registry_probe"]
        assert one["health"]["status"] == "unhealthy"
        assert one["health"]["last_heartbeat"]  # when it was last heard from
        assert one["current_load"] == 0 and not one.get("connected_at")
        assert one["configuration"] == {"model": "small", "temperature": 0.7}

        listed = (await client.get("/api/v1/agents", params={"status": "offline"})).json()
        assert [a["agent_id"] for a in listed["agents"]] == [agent_id]
        assert (listed["total"], listed["active"], listed["idle"], listed["busy"]) == (1, 0, 0, 0)
        idle = (await client.get("/api/v1/agents", params={"status": "idle"})).json()
        assert idle["total"] == 0
        everything = (await client.get("/api/v1/agents")).json()
        assert [a["status"] for a in everything["agents"]] == ["offline"]

        # An offline agent can be configured; it gets the change when it comes back.
        patched = await client.patch(f"/api/v1/agents/{agent_id}/config", json={"model": "big"})
        assert patched.status_code == 200, patched.text

    other = Owner(mesh)
    async with httpx.AsyncClient(base_url=mesh.url, headers=other.headers) as client:
        assert (await client.get("/api/v1/agents", params={"status": "offline"})).json()[
            "total"
        ] == 0
        assert_envelope(await client.get(f"/api/v1/agents/{agent_id}"), 404, "NOT_FOUND")
        denied = await client.patch(f"/api/v1/agents/{agent_id}/config", json={"x": 1})
        assert_envelope(denied, 404, "NOT_FOUND")

    events = agent_events(mesh, agent_id)
    assert [kind for kind, _, _ in events] == [
        "agent.online",
        "agent.offline",
        "agent.config_updated",
    ]
    assert {owner_id for _, owner_id, _ in events} == {owner.id}
    online, gone, updated = (data for _, _, data in events)
    assert online["agent_id"] == agent_id and online["name"] == "leaver"
    assert online["status"] == "idle" and online["capabilities"] == ["registry_probe"]
    assert gone["status"] == "offline" and gone["last_seen_at"]
    assert updated["updated_fields"] == ["model"] and updated["status"] == "offline"

    # Back again, it says its defaults and gets the override.
    again = StreamAgent(mesh, owner.key, "leaver")
    try:
        welcome = (await again.next("welcome")).welcome
        assert welcome.agent_id == agent_id
        assert dict(welcome.configuration) == {"model": "big", "temperature": 0.7}
    finally:
        await again.close()


async def test_a_cancellation_names_the_attempt(mesh: MeshProcess) -> None:
    owner = Owner(mesh)
    capability = f"probe_{secrets.token_hex(4)}"
    agent = StreamAgent(mesh, owner.key, "canceller", capability)
    try:
        await agent.next("welcome")
        task = owner.create(type=capability, description="to be cancelled")
        assignment = (await agent.next("assignment")).assignment
        assert assignment.task.task_id == task["task_id"] and assignment.attempt_token
        reply = httpx.delete(f"{mesh.url}/api/v1/tasks/{task['task_id']}", headers=owner.headers)
        assert reply.status_code == 200, reply.text
        cancellation = (await agent.next("cancellation")).cancellation
        assert cancellation.task_id == task["task_id"] and cancellation.reason == "CANCELLED"
        assert cancellation.attempt_token == assignment.attempt_token
    finally:
        await agent.close()


async def test_a_stop_passes_its_reason_to_the_agent_and_into_the_event(
    mesh: MeshProcess,
) -> None:
    """StopTask's reason, in the stopper's words, reaches the agent holding the task
    (Cancellation.message) and is kept in the task.stopped event; one over 500 characters is
    refused, and the task runs on."""
    owner = Owner(mesh)
    capability = f"probe_{secrets.token_hex(4)}"
    agent = StreamAgent(mesh, owner.key, "stopper", capability)
    try:
        await agent.next("welcome")
        task = owner.create(type=capability, description="to be stopped")
        assignment = (await agent.next("assignment")).assignment
        url = f"{mesh.url}/api/v1/tasks/{task['task_id']}/stop"
        too_long = httpx.post(url, json={"reason": "r" * 501}, headers=owner.headers)
        error = assert_envelope(too_long, 400, "VALIDATION_ERROR")
        assert error["details"] == {"field": "reason", "max": "500"}, error
        assert owner.task(task["task_id"])["status"] == "assigned"

        reason = "enough for today: the budget ran out"
        stopped = httpx.post(url, json={"reason": reason}, headers=owner.headers)
        assert stopped.status_code == 200, stopped.text
        cancellation = (await agent.next("cancellation")).cancellation
        assert (cancellation.task_id, cancellation.reason) == (task["task_id"], "STOPPED")
        assert cancellation.attempt_token == assignment.attempt_token
        assert cancellation.message == reason
    finally:
        await agent.close()
    with sqlite3.connect(mesh.data_dir / "agentmesh.db") as db:
        (data,) = db.execute(
            "SELECT data FROM tasks_outbox WHERE subject_id = ? AND event_type = 'task.stopped'",
            (task["task_id"],),
        ).fetchone()
    assert json.loads(data)["reason"] == reason


async def test_a_result_sent_as_the_stream_ends_counts_and_its_next_task_goes_back(
    mesh: MeshProcess,
) -> None:
    """The agent sends its result and its stream ends while the mesh is still recording it (the
    database is busy). The result counts; the task leased to the agent with it, which the
    stream can no longer deliver, is queued again at once with the attempt not counted, not
    left to wait out a lease nobody will renew."""
    owner = Owner(mesh)
    capability = f"probe_{secrets.token_hex(4)}"
    agent = StreamAgent(mesh, owner.key, "ender", capability, capacity=1)
    closed = False
    try:
        await agent.next("welcome")
        first = owner.create(type=capability, description="first")
        held = (await agent.next("assignment")).assignment
        assert held.task.task_id == first["task_id"]
        second = owner.create(type=capability, description="second")  # no room: it waits
        db = mesh.data_dir / "agentmesh.db"
        with contextlib.closing(sqlite3.connect(db, timeout=10, isolation_level=None)) as lock:
            lock.execute("BEGIN IMMEDIATE")  # the mesh's writes wait behind this
            result = agents_pb2.TaskResult(
                task_id=held.task.task_id, attempt_token=held.attempt_token
            )
            result.result.update({"ok": True})
            agent.send(agents_pb2.ConnectRequest(result=result))
            await asyncio.sleep(0.5)  # the result waits for the database...
            await agent.close()  # ...when the stream ends
            closed = True
            await asyncio.sleep(0.5)
            lock.execute("ROLLBACK")

        async def completed() -> bool:
            return owner.task(first["task_id"])["status"] == "completed"

        await until(completed, "the result sent before the stream ended", timeout=8)
        await asyncio.sleep(0.5)  # the next task's hand-back follows the result's commit
        after = owner.task(second["task_id"])
        assert (after["status"], after.get("attempt", 0), after.get("error_code", "")) == (
            "queued",
            0,
            "",
        )
        assert owner.task(first["task_id"])["attempt"] == 1
    finally:
        if not closed:
            await agent.close()


async def test_overrides_and_identity_survive_a_mesh_restart(tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "registry"
    with MeshProcess(data_dir=data, port=port, env=FAST) as mesh:
        owner = Owner(mesh)
        key = key_id(owner)
        agent = StreamAgent(mesh, owner.key, "keeper")
        agent_id = (await agent.next("welcome")).welcome.agent_id
        # Connected while the mesh stops: the shutdown ends its stream and records it offline.
        stayer = StreamAgent(mesh, owner.key, "stayer")
        stayer_id = (await stayer.next("welcome")).welcome.agent_id
        async with httpx.AsyncClient(base_url=mesh.url, headers=owner.headers) as client:
            patched = await client.patch(
                f"/api/v1/agents/{agent_id}/config",
                params={"update_mask": "temperature,model"},
                json={"temperature": 0.9},
            )
            assert patched.json()["configuration"] == {"temperature": 0.9}
        # Online: by id and by the key it connected with, over gRPC as a mesh service.
        by_key = [a for a in resolve(mesh, key_id=key) if a.name == "keeper"]
        for found in (resolve(mesh, agent_ids=[agent_id, "unknown"]), by_key):
            assert [(a.agent_id, a.owner_id, a.key_id, a.name, a.online) for a in found] == [
                (agent_id, owner.id, key, "keeper", True)
            ]
        assert len(resolve(mesh, key_id=key)) == 2
        # Alive through several heartbeat intervals (the stream's pings are answered).
        await asyncio.sleep(4)
        assert resolve(mesh, agent_ids=[agent_id])[0].online
        await agent.close()

        async def offline() -> bool:
            return not resolve(mesh, agent_ids=[agent_id])[0].online

        await until(offline, "the agent to go offline")
        with grpc.insecure_channel(mesh.services["agents"]) as channel:
            try:
                agents_pb2_grpc.AgentsInternalServiceStub(channel).ResolveAgents(
                    agents_pb2.ResolveAgentsRequest(agent_ids=[f"a{i}" for i in range(101)]),
                    metadata=((INTERNAL_HEADER, (data / "keys" / "internal-token").read_text()),),
                    timeout=10,
                )
                raise AssertionError("101 ids were accepted")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert error_reason(exc) == "VALIDATION_ERROR"
        # Stopped off the event loop, so that the stayer keeps answering pings meanwhile.
        assert await asyncio.to_thread(mesh.stop) == 0

    await stayer.close()
    with MeshProcess(data_dir=data, port=port, env=FAST) as mesh:
        owner.mesh = mesh
        owner.login()
        found = sorted((a.name, a.agent_id, a.online) for a in resolve(mesh, key_id=key))
        assert found == [("keeper", agent_id, False), ("stayer", stayer_id, False)]
        stayer_events = agent_events(mesh, stayer_id)
        assert [kind for kind, _, _ in stayer_events] == ["agent.online", "agent.offline"]
        # Written when the shutdown ended its stream, not found stale by the reaper later.
        assert stayer_events[1][2]["reason"] != "HEARTBEAT_LOST"
        async with httpx.AsyncClient(base_url=mesh.url, headers=owner.headers) as client:
            one = (await client.get(f"/api/v1/agents/{agent_id}")).json()
            assert one["status"] == "offline"
            assert one["configuration"] == {"temperature": 0.9}
            # The agent comes back with its defaults; the override still wins.
            agent = StreamAgent(mesh, owner.key, "keeper")
            try:
                welcome = (await agent.next("welcome")).welcome
                assert welcome.agent_id == agent_id
                assert dict(welcome.configuration) == {"temperature": 0.9}
                one = (await client.get(f"/api/v1/agents/{agent_id}")).json()
                assert one["status"] == "idle" and one["configuration"] == {"temperature": 0.9}
                assert resolve(mesh, agent_ids=[agent_id])[0].online
            finally:
                await agent.close()
        await until(offline, "the agent to go offline again")
        kinds = [kind for kind, _, _ in agent_events(mesh, agent_id)]
        assert kinds == [
            "agent.online",
            "agent.config_updated",
            "agent.offline",
            "agent.online",
            "agent.offline",
        ]


async def test_revoking_the_key_ends_its_open_stream(tmp_path: Path) -> None:
    """A stream outlives the call that opened it: the key it came with is checked again every
    heartbeat interval (1 s here). Revoked, the stream ends with the refusal, takes no more
    work, and the task it held goes back to the queue for another agent."""
    with MeshProcess(data_dir=tmp_path / "mesh", env=FAST) as mesh:
        await _revoked_while_streaming(mesh)


async def _revoked_while_streaming(mesh: MeshProcess) -> None:
    owner = Owner(mesh)
    keys = httpx.get(mesh.url + "/api/v1/auth/api-keys", headers=owner.headers).json()
    key_id = next(k["key_id"] for k in keys["api_keys"] if k["name"] == "workers")
    capability = f"rv_{secrets.token_hex(4)}"
    agent = StreamAgent(mesh, owner.key, "revoked", capability, capacity=1)
    try:
        task = owner.create(type=capability, description="held while revoked")
        held = (await agent.next("assignment")).assignment
        assert held.task.task_id == task["task_id"]
        revoked = httpx.delete(f"{mesh.url}/api/v1/auth/api-keys/{key_id}", headers=owner.headers)
        assert revoked.status_code == 200, revoked.text
        async with asyncio.timeout(10):  # a heartbeat interval is 1 s here
            ended = (await agent.next("error")).error
        assert ended.code == "AUTH_REQUIRED" and "revoked" in ended.message
        again = owner.task(task["task_id"])
        assert (again["status"], again["error_code"]) == ("queued", "AGENT_STOPPED")
        owner.create(type=capability, description="not for a revoked key")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(2):
                await agent.next("assignment")
    finally:
        await agent.close()
