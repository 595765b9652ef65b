"""Responses stay within what gRPC and Envoy carry, however large the items a client stored:
a list page stops at its byte bound and says where the next one starts, and an agent's result
is bounded when it is recorded, not when somebody reads it."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import grpc
import httpx

from agentmesh.v1 import agents_pb2
from servers.common.pagination import PAGE_MAX_BYTES
from servers.launcher import MeshProcess
from tests.e2e.test_agent_registry import StreamAgent
from tests.e2e.test_agents import Owner
from tests.e2e.test_messaging import Developer, send
from tests.helpers import register

# Past gRPC's 4 MiB message limit when listed whole.
BEYOND_A_MESSAGE = 5 << 20


def walk(client: httpx.Client, path: str, key: str, headers: dict[str, str]) -> list[dict]:
    """Every item of a list, a page of up to 100 at a time, following each answer's own
    `offset + limit`; checks each page on the way."""
    items: list[dict] = []
    offset, more = 0, True
    while more:
        reply = client.get(path, params={"limit": 100, "offset": offset}, headers=headers)
        assert reply.status_code == 200, reply.text[:300]
        page = reply.json()
        assert page["offset"] == offset
        if page["has_more"]:
            assert len(page[key]) == page["limit"] >= 1
        assert len(reply.content) < 3 * PAGE_MAX_BYTES
        items += page[key]
        offset, more = offset + page["limit"], page["has_more"]
    assert len(items) == page["total"]
    return items


def test_a_page_of_large_tasks_stops_at_its_bound(mesh: MeshProcess) -> None:
    """32 tasks near their field limits are 5 MiB: asked for whole, the server failed with
    RESOURCE_EXHAUSTED, a 429 RATE_LIMIT_EXCEEDED that a client would retry for ever."""
    with httpx.Client(base_url=mesh.url, timeout=30) as client:
        owner = register(client)
        blob = {"blob": "m" * 60_000}
        created = []
        for n in range(BEYOND_A_MESSAGE // 160_000):
            body = {"description": f"{n} " + "d" * 99_000, "metadata": blob}
            reply = client.post("/api/v1/tasks", json=body, headers=owner.headers)
            assert reply.status_code == 201, reply.text[:300]
            created.append(reply.json()["task_id"])

        first = client.get("/api/v1/tasks", params={"limit": 100}, headers=owner.headers)
        assert first.status_code == 200, first.text[:300]
        page = first.json()
        assert 1 < page["limit"] == len(page["tasks"]) < len(created)
        assert page["has_more"] is True and page["total"] == len(created)

        tasks = walk(client, "/api/v1/tasks", "tasks", owner.headers)
        assert [t["task_id"] for t in tasks] == created[::-1]  # newest first, each once
        assert all(t["metadata"] == blob for t in tasks)


async def test_a_page_of_large_messages_stops_at_its_bound(mesh: MeshProcess) -> None:
    developer = Developer(mesh, None)
    alice, bob = await developer.agent(), await developer.agent()
    payload = {"text": "p" * 250_000}
    async with httpx.AsyncClient(base_url=mesh.url, timeout=30) as client:
        sent = []
        for _ in range(BEYOND_A_MESSAGE // 250_000):
            reply = await send(client, alice, bob, payload=payload)
            assert reply.status_code == 201, reply.text[:300]
            sent.append(reply.json()["message_id"])
    with httpx.Client(base_url=mesh.url, timeout=30) as client:
        messages = walk(client, f"/api/v1/agents/{bob.id}/messages", "messages", bob.headers)
    assert [m["message_id"] for m in messages] == sent  # oldest first, each once
    assert all(m["payload"] == payload for m in messages)


async def test_a_result_over_its_limit_fails_the_task(mesh: MeshProcess) -> None:
    """A Connect frame may carry 4 MiB; a result kept at that size would make every read of its
    task (and a page of them) that large. Past 1 MiB of JSON the attempt fails, for good."""
    owner = Owner(mesh)
    capability = f"sizes_{secrets.token_hex(4)}"
    agent = StreamAgent(mesh, owner.key, "verbose", capability, capacity=1)
    try:
        await agent.next("welcome")
        outcomes = {}
        for name, size in (("fits", (1 << 20) - 100), ("too_large", (1 << 20) + 1)):
            task = owner.create(type=capability, description=name)
            held = (await agent.next("assignment")).assignment
            assert held.task.task_id == task["task_id"]
            result = agents_pb2.TaskResult(
                task_id=held.task.task_id, attempt_token=held.attempt_token
            )
            result.result.update({"text": "r" * (size - len('{"text":""}'))})
            agent.send(agents_pb2.ConnectRequest(result=result))
            ack = (await agent.next("result_ack")).result_ack
            assert ack.accepted and ack.task_id == task["task_id"]
            outcomes[name] = (ack.status, task["task_id"])

        assert outcomes["fits"][0] == "completed"
        kept = owner.task(outcomes["fits"][1])
        assert kept["status"] == "completed" and len(kept["result"]["text"]) == (1 << 20) - 111

        assert outcomes["too_large"][0] == "failed"
        failed = owner.task(outcomes["too_large"][1])
        assert (failed["status"], failed["error_code"], failed["attempt"]) == (
            "failed",
            "RESULT_TOO_LARGE",
            1,
        )
        assert "1048576" in failed["error"] and "result" not in failed

        # The 1 MiB result does not fit a page behind the other task: it starts the next one.
        with httpx.Client(base_url=mesh.url, timeout=30) as client:
            listed = walk(client, "/api/v1/tasks", "tasks", owner.headers)
        assert [t["task_id"] for t in listed] == [failed["task_id"], kept["task_id"]]
    finally:
        await agent.close()


def _nested(levels: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


async def test_a_result_nested_too_deep_fails_the_task(mesh: MeshProcess) -> None:
    """A result nested past 20 levels could not be carried in a page of tasks or an event:
    the attempt fails, for good, as one too large does."""
    owner = Owner(mesh)
    capability = f"deep_{secrets.token_hex(4)}"
    agent = StreamAgent(mesh, owner.key, "deep", capability, capacity=1)
    try:
        task = owner.create(type=capability, description="deep")
        held = (await agent.next("assignment")).assignment
        result = agents_pb2.TaskResult(task_id=held.task.task_id, attempt_token=held.attempt_token)
        result.result.update(_nested(25))
        agent.send(agents_pb2.ConnectRequest(result=result))
        ack = (await agent.next("result_ack")).result_ack
        assert ack.accepted and ack.status == "failed"
        failed = owner.task(task["task_id"])
        assert (failed["error_code"], failed["attempt"]) == ("RESULT_TOO_DEEP", 1)
        with httpx.Client(base_url=mesh.url) as client:
            listed = client.get("/api/v1/tasks", headers=owner.headers)
        assert listed.status_code == 200, listed.text[:300]
    finally:
        await agent.close()


async def test_a_frame_that_does_not_decode_ends_the_stream_with_a_reason(
    mesh: MeshProcess,
) -> None:
    """A Connect frame grpc cannot parse (here a string that is not UTF-8) is answered with a
    VALIDATION_ERROR StreamError, not a silent end of the stream."""
    owner = Owner(mesh)
    hello = agents_pb2.Hello(name="garbled", capabilities=[f"g_{secrets.token_hex(4)}"])
    heartbeat = agents_pb2.ConnectRequest(
        heartbeat=agents_pb2.AgentHeartbeat(task_ids=["PLACEHOLDER"])
    ).SerializeToString()
    frames = [
        agents_pb2.ConnectRequest(hello=hello).SerializeToString(),
        heartbeat.replace(b"PLACEHOLDER", b"\xff" * len(b"PLACEHOLDER")),
    ]

    async def requests() -> AsyncIterator[bytes]:
        for frame in frames:
            yield frame
        await asyncio.sleep(30)  # the server ends the stream first

    async with grpc.aio.insecure_channel(mesh.url.removeprefix("http://")) as channel:
        connect = channel.stream_stream(
            "/agentmesh.v1.AgentsService/Connect",
            request_serializer=lambda raw: raw,
            response_deserializer=agents_pb2.ConnectResponse.FromString,
        )
        call = connect(requests(), metadata=(("authorization", f"Bearer {owner.key}"),))
        kinds, last = [], None
        async with asyncio.timeout(20):
            async for frame in call:
                kinds.append(frame.WhichOneof("kind"))
                last = frame
    assert kinds[0] == "welcome" and kinds[-1] == "error", kinds
    assert last is not None and last.error.code == "VALIDATION_ERROR"
    assert last.error.message == "the request could not be decoded: a string is not valid UTF-8"
