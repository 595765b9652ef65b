"""Inter-agent messaging through Envoy (REST and SSE) and gRPC, against the real mesh: agents
are registered with the real agents service by connecting a Connect stream with their key."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import redis

from agentmesh.v1 import agents_pb2, agents_pb2_grpc, messaging_pb2, messaging_pb2_grpc
from servers.launcher import MeshProcess
from tests.conftest import SHARED_MESH_ENV, _fresh_postgres, _stop_clean, _unavailable
from tests.helpers import assert_envelope, error_reason, grant_role, new_user

REDIS_URL = os.environ.get("AGENTMESH_TEST_REDIS", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True)
class Agent:
    id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.key}"),)


class Developer:
    """A developer who makes agent keys and registers agents with them."""

    def __init__(self, mesh: MeshProcess, database_url: str | None) -> None:
        self.mesh = mesh
        user = new_user()
        with httpx.Client(base_url=mesh.url) as client:
            assert client.post("/api/v1/auth/register", json=user).status_code == 201
            grant_role(mesh, user["username"], "developer", database_url)
            login = client.post(
                "/api/v1/auth/login",
                json={"username": user["username"], "password": user["password"]},
            )
        self.headers = {"Authorization": f"Bearer {login.json()['access_token']}"}

    def key(self) -> str:
        reply = httpx.post(
            self.mesh.url + "/api/v1/auth/api-keys",
            json={"name": "agent", "scopes": ["agent"]},
            headers=self.headers,
        )
        assert reply.status_code == 201, reply.text
        return str(reply.json()["key"])

    async def agent(self, key: str | None = None) -> Agent:
        """An agent registered with ``key`` (a new key by default), offline again afterwards."""
        key = key or self.key()
        requests: asyncio.Queue[agents_pb2.ConnectRequest | None] = asyncio.Queue()
        requests.put_nowait(
            agents_pb2.ConnectRequest(
                hello=agents_pb2.Hello(
                    name=f"messenger-{uuid.uuid4().hex[:8]}",
                    type="specialist",
                    # A capability no test queues work for: this agent must stay idle.
                    capabilities=["messaging_probe"],
                    max_capacity=1,
                )
            )
        )

        async def frames() -> AsyncIterator[agents_pb2.ConnectRequest]:
            while (item := await requests.get()) is not None:
                yield item

        async with grpc.aio.insecure_channel(self.mesh.url.removeprefix("http://")) as channel:
            call = agents_pb2_grpc.AgentsServiceStub(channel).Connect(
                frames(), metadata=(("authorization", f"Bearer {key}"),)
            )
            first = await asyncio.wait_for(call.read(), 10)
            assert first.HasField("welcome"), first
            # The agent stops: it closes its side and the server ends the stream.
            requests.put_nowait(None)
            while await asyncio.wait_for(call.read(), 10) is not grpc.aio.EOF:
                pass
        return Agent(first.welcome.agent_id, key)


@pytest.fixture(scope="module")
def developer(mesh: MeshProcess) -> Developer:
    return Developer(mesh, None)


@pytest.fixture(scope="module")
def any_developer(
    request: pytest.FixtureRequest, any_mesh: MeshProcess, mesh: MeshProcess
) -> Developer:
    url = None if any_mesh is mesh else str(request.getfixturevalue("postgres_url"))
    return Developer(any_mesh, url)


@pytest.fixture
async def rest(developer: Developer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=developer.mesh.url, timeout=10) as client:
        yield client


class Inbox:
    """An agent's StreamInbox, over gRPC through Envoy, read in the background (a timed-out
    read must not cancel the call)."""

    def __init__(self, mesh: MeshProcess, agent: Agent) -> None:
        self._channel = grpc.aio.insecure_channel(mesh.url.removeprefix("http://"))
        self._call = messaging_pb2_grpc.MessagingServiceStub(self._channel).StreamInbox(
            messaging_pb2.StreamInboxRequest(agent_id=agent.id), metadata=agent.metadata
        )
        self._frames: asyncio.Queue[messaging_pb2.StreamInboxResponse | BaseException] = (
            asyncio.Queue()
        )
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for frame in self._call:
                await self._frames.put(frame)
        except grpc.aio.AioRpcError as exc:
            await self._frames.put(exc)

    async def next(self, timeout: float = 5.0) -> messaging_pb2.StreamInboxResponse:
        frame = await asyncio.wait_for(self._frames.get(), timeout)
        if isinstance(frame, BaseException):
            raise frame
        return frame

    async def message(self, timeout: float = 5.0) -> messaging_pb2.AgentMessage:
        while True:
            frame = await self.next(timeout)
            kind = frame.WhichOneof("kind")
            if kind == "message":
                return frame.message
            assert kind == "heartbeat", frame

    async def quiet(self, seconds: float) -> None:
        """Nothing but heartbeats for ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                frame = await self.next(left)
            except TimeoutError:
                return
            assert frame.WhichOneof("kind") == "heartbeat", frame

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self._channel.close()


async def send(
    client: httpx.AsyncClient, sender: Agent, to: Agent | str, **body: Any
) -> httpx.Response:
    body["to_agent"] = to if isinstance(to, str) else to.id
    body.setdefault("type", "event")
    return await client.post("/api/v1/messages", json=body, headers=sender.headers)


async def test_offline_delivery_acknowledgement_and_redelivery(any_developer: Developer) -> None:
    dev = any_developer
    alice, bob = await dev.agent(), await dev.agent()
    async with httpx.AsyncClient(base_url=dev.mesh.url, timeout=10) as client:
        # Bob is offline: the message waits for him.
        first = await send(
            client, alice, bob, type="request", payload={"action": "review_code"}, ttl_seconds=60
        )
        assert first.status_code == 201, first.text
        sent = first.json()
        assert sent["from_agent"] == alice.id and sent["to_agent"] == bob.id
        assert sent["payload"] == {"action": "review_code"} and "acked_at" not in sent
        assert sent["message_id"].startswith("msg-") and sent["ttl_seconds"] == 60
        # Repeating a message_id sends nothing and answers the stored message.
        keyed = await send(client, alice, bob, message_id=f"k-{uuid.uuid4().hex}")
        assert keyed.status_code == 201
        again = await send(client, alice, bob, message_id=keyed.json()["message_id"])
        assert again.status_code == 200 and again.json() == keyed.json()

        inbox = Inbox(dev.mesh, bob)
        try:
            got = [await inbox.message(), await inbox.message()]
            assert [m.message_id for m in got] == [sent["message_id"], keyed.json()["message_id"]]
            assert got[0].from_agent == alice.id and got[0].payload["action"] == "review_code"
            acked = await client.post(
                f"/api/v1/messages/{sent['message_id']}/ack", json={}, headers=bob.headers
            )
            assert acked.status_code == 200, acked.text
            assert acked.json()["acked_at"] is not None
            # Live delivery while connected; nothing twice on one stream.
            live = await send(client, alice, bob, payload={"n": 3})
            assert (await inbox.message()).message_id == live.json()["message_id"]
            await inbox.quiet(1.5)
        finally:
            await inbox.close()

        # Reconnected: the unacknowledged ones come again, the acknowledged one does not.
        inbox = Inbox(dev.mesh, bob)
        try:
            again_ids = [(await inbox.message()).message_id for _ in range(2)]
            assert again_ids == [keyed.json()["message_id"], live.json()["message_id"]]
        finally:
            await inbox.close()


async def test_request_and_response_between_two_agents(any_developer: Developer) -> None:
    dev = any_developer
    asker, reviewer = await dev.agent(), await dev.agent()
    inbox = Inbox(dev.mesh, reviewer)
    async with httpx.AsyncClient(base_url=dev.mesh.url, timeout=10) as client:

        async def answer() -> None:
            request = await inbox.message()
            assert request.type == "request" and request.from_agent == asker.id
            reply = await send(
                client,
                reviewer,
                asker,
                type="response",
                correlation_id=request.correlation_id,
                payload={"verdict": "approved", "for": request.payload["task_id"]},
            )
            assert reply.status_code == 201, reply.text

        try:
            await inbox.next()  # the stream is open before the request goes out
            answering = asyncio.ensure_future(answer())
            started = time.perf_counter()
            reply = await client.post(
                "/api/v1/messages/request",
                json={"to_agent": reviewer.id, "payload": {"task_id": "task-789"}},
                headers=asker.headers,
            )
            elapsed = time.perf_counter() - started
            await answering
        finally:
            await inbox.close()
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["request"]["correlation_id"] == body["response"]["correlation_id"]
        assert body["response"]["payload"] == {"verdict": "approved", "for": "task-789"}
        assert body["response"]["acked_at"] is not None
        assert elapsed < 2.0, elapsed
        # Delivered to the waiting call, so not left in the asker's inbox.
        unacked = await client.get(
            f"/api/v1/agents/{asker.id}/messages",
            params={"unacked": "true"},
            headers=asker.headers,
        )
        assert unacked.json()["total"] == 0
        # Answering acknowledged the request: the reviewer's inbox holds nothing to redo.
        pending = await client.get(
            f"/api/v1/agents/{reviewer.id}/messages",
            params={"unacked": "true"},
            headers=reviewer.headers,
        )
        assert pending.json()["total"] == 0


async def test_a_request_nobody_answers_times_out(
    developer: Developer, rest: httpx.AsyncClient
) -> None:
    asker, silent = await developer.agent(), await developer.agent()
    started = time.monotonic()
    reply = await rest.post(
        "/api/v1/messages/request",
        json={"to_agent": silent.id, "timeout_ms": 300, "correlation_id": "c-timeout"},
        headers=asker.headers,
    )
    error = assert_envelope(reply, 504, "TIMEOUT_ERROR")
    assert error["details"]["correlation_id"] == "c-timeout"  # type: ignore[index]
    assert time.monotonic() - started < 3
    # The request itself waits in the recipient's inbox.
    listed = await rest.get(f"/api/v1/agents/{silent.id}/messages", headers=silent.headers)
    assert [m["correlation_id"] for m in listed.json()["messages"]] == ["c-timeout"]
    # Over gRPC the caller's own deadline counts too.
    async with grpc.aio.insecure_channel(developer.mesh.url.removeprefix("http://")) as ch:
        stub = messaging_pb2_grpc.MessagingServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.SendRequest(
                messaging_pb2.SendRequestRequest(to_agent=silent.id),
                metadata=asker.metadata,
                timeout=0.5,
            )
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_who_sends_and_who_reads_is_decided_by_the_key(
    developer: Developer, rest: httpx.AsyncClient
) -> None:
    alice, bob = await developer.agent(), await developer.agent()
    # Naming another agent as the sender.
    spoofed = await send(rest, alice, bob, from_agent=bob.id)
    assert_envelope(spoofed, 403, "INSUFFICIENT_PERMISSIONS")
    assert (await send(rest, alice, bob, from_agent=alice.id)).status_code == 201
    # A key no agent connected with yet.
    assert_envelope(
        await send(rest, Agent("", developer.key()), bob), 403, "INSUFFICIENT_PERMISSIONS"
    )
    # A key two agents share: from_agent says which one sends.
    shared = developer.key()
    one, two = await developer.agent(shared), await developer.agent(shared)
    assert_envelope(await send(rest, one, bob), 400, "VALIDATION_ERROR")
    reply = await send(rest, one, bob, from_agent=two.id)
    assert reply.status_code == 201 and reply.json()["from_agent"] == two.id
    # SendRequest the same way: without from_agent a shared key is refused before anything is
    # sent, another key's agent is not a sender, and the agent named is the one that asks.
    asked = await rest.post(
        "/api/v1/messages/request", json={"to_agent": bob.id}, headers=one.headers
    )
    assert_envelope(asked, 400, "VALIDATION_ERROR")
    posing = await rest.post(
        "/api/v1/messages/request",
        json={"to_agent": bob.id, "from_agent": alice.id},
        headers=one.headers,
    )
    assert_envelope(posing, 403, "INSUFFICIENT_PERMISSIONS")
    unanswered = await rest.post(
        "/api/v1/messages/request",
        json={"to_agent": bob.id, "from_agent": two.id, "timeout_ms": 200},
        headers=one.headers,
    )
    assert_envelope(unanswered, 504, "TIMEOUT_ERROR")
    held = await rest.get(
        f"/api/v1/agents/{bob.id}/messages", params={"unacked": "true"}, headers=bob.headers
    )
    requests = [m for m in held.json()["messages"] if m["type"] == "request"]
    assert [m["from_agent"] for m in requests] == [two.id]
    # A user's token is not an agent.
    by_user = await rest.post(
        "/api/v1/messages", json={"to_agent": bob.id, "type": "event"}, headers=developer.headers
    )
    assert_envelope(by_user, 403, "INSUFFICIENT_PERMISSIONS")
    # Another agent's inbox does not exist for alice, in any form.
    assert_envelope(
        await rest.get(f"/api/v1/agents/{bob.id}/messages", headers=alice.headers),
        404,
        "NOT_FOUND",
    )
    assert_envelope(
        await rest.get(f"/api/v1/agents/{bob.id}/messages/stream", headers=alice.headers),
        404,
        "NOT_FOUND",
    )
    message_id = reply.json()["message_id"]
    assert_envelope(
        await rest.post(f"/api/v1/messages/{message_id}/ack", json={}, headers=alice.headers),
        404,
        "NOT_FOUND",
    )
    inbox = Inbox(developer.mesh, Agent(bob.id, alice.key))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await inbox.next()
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(hidden.value) == "NOT_FOUND"
    finally:
        await inbox.close()
    # Another agent's message_id.
    assert_envelope(await send(rest, alice, bob, message_id=message_id), 409, "CONFLICT")


async def test_invalid_messages(developer: Developer, rest: httpx.AsyncClient) -> None:
    alice, bob = await developer.agent(), await developer.agent()
    assert_envelope(await send(rest, alice, f"agent-{uuid.uuid4()}"), 404, "NOT_FOUND")
    big = {"blob": "x" * (256 * 1024)}
    for body in (
        {"payload": big},
        {"ttl_seconds": 86_401},
        {"ttl_seconds": -5},
        {"type": "gossip"},
        {"type": "response"},
        {"message_id": "no spaces please"},
    ):
        error = assert_envelope(await send(rest, alice, bob, **body), 400, "VALIDATION_ERROR")
        assert error["details"]["field"] in body or body == {"type": "response"}  # type: ignore[index]
    reply = await rest.post(
        "/api/v1/messages/request",
        json={"to_agent": bob.id, "timeout_ms": 300_001},
        headers=alice.headers,
    )
    assert_envelope(reply, 400, "VALIDATION_ERROR")
    assert_envelope(
        await rest.get(
            f"/api/v1/agents/{bob.id}/messages", params={"limit": 101}, headers=bob.headers
        ),
        400,
        "VALIDATION_ERROR",
    )
    # The same over gRPC: the status and ErrorInfo reason.
    async with grpc.aio.insecure_channel(developer.mesh.url.removeprefix("http://")) as ch:
        stub = messaging_pb2_grpc.MessagingServiceStub(ch)
        request = messaging_pb2.SendMessageRequest(to_agent=bob.id, type="event", ttl_seconds=0)
        request.payload.update({"n": 1})
        sent = await stub.SendMessage(request, metadata=alice.metadata)
        assert sent.from_agent == alice.id and sent.ttl_seconds == 3600
        request.ttl_seconds = 100_000
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.SendMessage(request, metadata=alice.metadata)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(bad.value) == "VALIDATION_ERROR"


async def test_a_sender_over_its_rate_is_told_when_to_retry(
    developer: Developer, rest: httpx.AsyncClient
) -> None:
    alice, bob = await developer.agent(), await developer.agent()
    replies = await asyncio.gather(*(send(rest, alice, bob) for _ in range(70)))
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(201) <= 50 and 429 in statuses, statuses
    limited = next(r for r in replies if r.status_code == 429)
    error = assert_envelope(limited, 429, "RATE_LIMIT_EXCEEDED")
    assert int(error["details"]["retry_after"]) >= 1  # type: ignore[index]
    assert limited.headers["retry-after"] == error["details"]["retry_after"]  # type: ignore[index]
    # The limit is the sender's: bob may still write.
    assert (await send(rest, bob, alice)).status_code == 201


async def test_the_inbox_as_server_sent_events(
    developer: Developer, rest: httpx.AsyncClient
) -> None:
    alice, bob = await developer.agent(), await developer.agent()
    waiting = (await send(rest, alice, bob, payload={"n": 1})).json()
    frames: list[dict[str, str]] = []
    async with rest.stream(
        "GET", f"/api/v1/agents/{bob.id}/messages/stream", headers=bob.headers
    ) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        frame: dict[str, str] = {}
        lines = stream.aiter_lines()
        live: dict[str, Any] = {}
        while len([f for f in frames if f.get("event") == "message"]) < 2:
            line = await asyncio.wait_for(anext(lines), 5)
            if line:
                name, _, value = line.partition(": ")
                frame[name] = value
                continue
            frames.append(frame)
            if frame.get("event") == "message" and not live:
                live = (await send(rest, alice, bob, payload={"n": 2})).json()
            frame = {}
    assert frames[0] == {"retry": "1000"}
    messages = [f for f in frames if f.get("event") == "message"]
    assert [m["id"] for m in messages] == [waiting["message_id"], live["message_id"]]
    first = json.loads(messages[0]["data"])
    assert first["from_agent"] == alice.id and first["payload"] == {"n": 1}


async def test_list_inbox_pages_oldest_first(developer: Developer, rest: httpx.AsyncClient) -> None:
    alice, bob = await developer.agent(), await developer.agent()
    ids = [(await send(rest, alice, bob, payload={"i": i})).json()["message_id"] for i in range(5)]
    page = await rest.get(
        f"/api/v1/agents/{bob.id}/messages", params={"limit": 2, "offset": 1}, headers=bob.headers
    )
    body = page.json()
    assert [m["message_id"] for m in body["messages"]] == ids[1:3]
    assert (body["total"], body["limit"], body["offset"], body["has_more"]) == (5, 2, 1, True)
    await rest.post(f"/api/v1/messages/{ids[0]}/ack", json={}, headers=bob.headers)
    unacked = await rest.get(
        f"/api/v1/agents/{bob.id}/messages", params={"unacked": "true"}, headers=bob.headers
    )
    assert [m["message_id"] for m in unacked.json()["messages"]] == ids[1:]
    assert unacked.json()["has_more"] is False
    everything = await rest.get(f"/api/v1/agents/{bob.id}/messages", headers=bob.headers)
    assert everything.json()["total"] == 5
    assert everything.json()["messages"][0]["acked_at"] is not None


@pytest.fixture(scope="module")
def twins(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MeshProcess, MeshProcess, str]]:
    """Two meshes as two replicas: one PostgreSQL database, one Redis (bus and limits), and
    streams that poll only every 10 s, so that a prompt delivery proves the bus carried it."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.RedisError as exc:
        _unavailable(f"Redis at {REDIS_URL}", exc)
    database = _fresh_postgres()
    url = next(database)
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    env = {
        **SHARED_MESH_ENV,
        "DATABASE_URL": url,
        "REDIS_URL": REDIS_URL,
        "AGENTMESH_BUS_PREFIX": prefix,
        "AGENTMESH_STREAM_HEARTBEAT_SECONDS": "10",
    }
    first = MeshProcess(data_dir=tmp_path_factory.mktemp("twin-a"), env=env).start()
    try:
        second = MeshProcess(data_dir=tmp_path_factory.mktemp("twin-b"), env=env).start()
        try:
            yield first, second, url
        finally:
            _stop_clean(second)
    finally:
        _stop_clean(first)
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
        client.close()
        next(database, None)


async def test_a_message_sent_through_one_replica_reaches_a_stream_on_another(
    twins: tuple[MeshProcess, MeshProcess, str],
) -> None:
    here, there, database_url = twins
    dev = Developer(here, database_url)
    alice, bob = await dev.agent(), await dev.agent()
    inbox = Inbox(there, bob)
    async with httpx.AsyncClient(base_url=here.url, timeout=10) as client:
        try:
            await inbox.quiet(0.5)  # the stream is open and has read its (empty) backlog
            started = time.monotonic()
            sent = (await send(client, alice, bob, payload={"via": "redis"})).json()
            assert (await inbox.message(timeout=5)).message_id == sent["message_id"]
            assert time.monotonic() - started < 2.0  # woken through Redis, not the 10 s poll

            # A request waiting on one replica gets the response sent through the other.
            async def answer() -> None:
                request = await inbox.message(timeout=5)
                async with httpx.AsyncClient(base_url=there.url, timeout=10) as far:
                    reply = await send(
                        far, bob, alice, type="response", correlation_id=request.correlation_id
                    )
                    assert reply.status_code == 201, reply.text

            answering = asyncio.ensure_future(answer())
            started = time.monotonic()
            reply = await client.post(
                "/api/v1/messages/request",
                json={"to_agent": bob.id, "timeout_ms": 5000},
                headers=alice.headers,
            )
            await answering
            assert reply.status_code == 200, reply.text
            assert time.monotonic() - started < 2.0
        finally:
            await inbox.close()


async def test_an_agent_may_hold_four_inbox_streams(
    developer: Developer, rest: httpx.AsyncClient
) -> None:
    """Each open inbox stream reads messages ahead (up to 100 of up to 256 KiB): an agent
    holding dozens of them that read nothing grew the server by 15 MiB each. One agent needs
    one stream (two while it reconnects); a fifth is refused until one closes."""
    alice, bob = await developer.agent(), await developer.agent()
    path = f"/api/v1/agents/{bob.id}/messages/stream"
    async with contextlib.AsyncExitStack() as streams:
        for _ in range(4):
            opened = await streams.enter_async_context(
                rest.stream("GET", path, headers=bob.headers)
            )
            assert opened.status_code == 200
        refused = await rest.get(path, headers=bob.headers)
        error = assert_envelope(refused, 429, "RATE_LIMIT_EXCEEDED")
        assert refused.headers["retry-after"] == "5"
        assert error["details"] == {"limit": "4", "retry_after": "5"}
        # The limit is the agent's: another agent of the same owner is not affected.
        async with rest.stream(
            "GET", f"/api/v1/agents/{alice.id}/messages/stream", headers=alice.headers
        ) as theirs:
            assert theirs.status_code == 200


async def test_revoking_the_key_ends_the_inbox_stream_it_opened(
    developer: Developer, rest: httpx.AsyncClient
) -> None:
    """A stream outlives the call that opened it, not its credential: the agent's key is
    checked again every heartbeat interval (1 s here); revoked, the stream's last frame is the
    refusal."""
    created = await rest.post(
        "/api/v1/auth/api-keys",
        json={"name": "revoked-agent", "scopes": ["agent"]},
        headers=developer.headers,
    )
    assert created.status_code == 201, created.text
    key_id = created.json()["api_key"]["key_id"]
    alice, bob = await developer.agent(), await developer.agent(created.json()["key"])
    inbox = Inbox(developer.mesh, bob)
    try:
        first = (await send(rest, alice, bob, payload={"n": 1})).json()
        assert (await inbox.message()).message_id == first["message_id"]
        revoked = await rest.delete(f"/api/v1/auth/api-keys/{key_id}", headers=developer.headers)
        assert revoked.status_code == 200, revoked.text
        while (frame := await inbox.next(timeout=5)).WhichOneof("kind") == "heartbeat":
            pass
        assert frame.WhichOneof("kind") == "error", frame
        assert frame.error.code == "AUTH_REQUIRED" and "revoked" in frame.error.message
        with pytest.raises(TimeoutError):  # nothing after the last frame
            await inbox.next(timeout=1.5)
    finally:
        await inbox.close()
    # Its REST calls are refused as they always were; the inbox keeps what arrives.
    listed = await rest.get(f"/api/v1/agents/{bob.id}/messages", headers=bob.headers)
    assert_envelope(listed, 401, "AUTH_REQUIRED")
    later = await send(rest, alice, bob, payload={"n": 2})
    assert later.status_code == 201, later.text
