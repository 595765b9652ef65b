"""The registry of connected agents over REST (seed 004's GET /agents, /agents/{id}, PATCH
/agents/{id}/config), with a raw Connect stream standing as the agent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import httpx

from agentmesh.v1 import agents_pb2, agents_pb2_grpc
from servers.launcher import MeshProcess
from tests.e2e.test_agents import Owner
from tests.helpers import assert_envelope, new_user


class StreamAgent:
    """An agent that only says Hello and records what the server sends it."""

    def __init__(self, mesh: MeshProcess, key: str, name: str) -> None:
        self._queue: asyncio.Queue[agents_pb2.ConnectRequest | None] = asyncio.Queue()
        self._channel = grpc.aio.insecure_channel(mesh.url.removeprefix("http://"))
        self.frames: asyncio.Queue[agents_pb2.ConnectResponse] = asyncio.Queue()
        # A capability no other test queues work for: on the shared mesh this agent must stay
        # idle (agents serve every owner's tasks).
        hello = agents_pb2.Hello(
            name=name,
            type="specialist",
            capabilities=["registry_probe"],
            max_capacity=2,
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
            await self.frames.put(frame)

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
