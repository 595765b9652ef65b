"""Agent request/response: the round trip of MessagingService.SendRequest between two connected
agents, against the mesh's own floor for one authenticated gRPC call, measured in the same run.

  request_response  agent A calls SendRequest to agent B (gRPC through Envoy, one at a time);
                    B holds StreamInbox through Envoy and answers each request with
                    SendMessage(type "response"), which acknowledges it. Timed from A's send
                    to A's answer
  unary_floor       the baseline: A's key calls AuthService.GetMe through Envoy, one at a time:
                    what any authenticated call through the edge costs on this machine. Its calls
                    take turns on FLOOR_CONNECTIONS connections: one connection would meet the
                    edge's flood guard (500 requests/s per connection, envoy.yaml)

Both agents are registered by holding AgentsService.Connect, as real workers do. The mesh runs
as `agentmesh up` does, on SQLite and the in-process bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx

from agentmesh.v1 import (
    agents_pb2,
    agents_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    messaging_pb2,
    messaging_pb2_grpc,
)
from bench import dispatch
from bench.auth_me import CHANNEL_OPTIONS, CaseResult, Settings, _percentile
from bench.dispatch import Goal, Report, _developer, _expect
from servers.launcher import MeshProcess

NAME = "messaging"
# One request in flight measures latency, not the per-agent send limit (50/s by default), which
# a round trip of 20 ms reaches: B would be refused its answers.
MESH_ENV = {**dispatch.MESH_ENV, "AGENTMESH_MESSAGE_RATE_LIMIT": "100000"}
FLOOR_CONNECTIONS = 4
BASELINE = "unary_floor (GetMe through Envoy with the same agent key)"
GOAL_P50_MS = 5.0
CALL_TIMEOUT = 10.0
WARMUP = 20


def _key(mesh: MeshProcess, token: str, name: str) -> str:
    with httpx.Client(base_url=mesh.url, timeout=CALL_TIMEOUT, trust_env=False) as http:
        created = http.post(
            "/api/v1/auth/api-keys",
            json={"name": name, "scopes": ["agent"]},
            headers={"Authorization": f"Bearer {token}"},
        )
        return str(_expect(created, 201, "api key")["key"])


async def _connect(channel: grpc.aio.Channel, key: str, name: str) -> tuple[str, object]:
    """Holds Connect for an agent; returns its id and the call (cancel it to leave)."""
    queue: asyncio.Queue[agents_pb2.ConnectRequest] = asyncio.Queue()
    await queue.put(
        agents_pb2.ConnectRequest(
            hello=agents_pb2.Hello(name=name, capabilities=["bench-none"], max_capacity=1)
        )
    )

    async def frames() -> AsyncIterator[agents_pb2.ConnectRequest]:
        while True:
            yield await queue.get()

    stub = agents_pb2_grpc.AgentsServiceStub(channel)
    call = stub.Connect(frames(), metadata=(("x-api-key", key),))
    welcome = await call.read()
    return welcome.welcome.agent_id, call


async def _answer(channel: grpc.aio.Channel, key: str, me: str) -> None:
    """Agent B: answers every request in its inbox. The answer acknowledges the request (see
    MessagingService.SendMessage), so B makes no AckMessage call."""
    stub = messaging_pb2_grpc.MessagingServiceStub(channel)
    metadata = (("x-api-key", key),)
    async for frame in stub.StreamInbox(
        messaging_pb2.StreamInboxRequest(agent_id=me), metadata=metadata
    ):
        if not frame.HasField("message") or frame.message.type != "request":
            continue
        request = frame.message
        await stub.SendMessage(
            messaging_pb2.SendMessageRequest(
                to_agent=request.from_agent,
                type="response",
                correlation_id=request.correlation_id,
                payload=request.payload,
            ),
            metadata=metadata,
            timeout=CALL_TIMEOUT,
        )


async def _timed(seconds: float, call: object) -> tuple[list[float], int, str]:
    latencies: list[float] = []
    errors, first = 0, ""
    deadline = time.monotonic() + seconds
    count = 0
    while time.monotonic() < deadline or count < WARMUP:
        started = time.perf_counter()
        try:
            await call()  # type: ignore[operator]
        except grpc.aio.AioRpcError as exc:
            errors += 1
            first = first or f"{exc.code().name}: {exc.details()}"
            if errors > 20:
                break
            continue
        count += 1
        if count > WARMUP:
            latencies.append((time.perf_counter() - started) * 1000)
    return sorted(latencies), errors, first


async def _cases(mesh: MeshProcess, seconds: float) -> list[CaseResult]:
    token, key_a = _developer(mesh)
    key_b = _key(mesh, token, "bench-b")
    edge = mesh.url.removeprefix("http://")
    # Each agent on its own connection, as two worker processes would be: on one connection
    # their calls together pass the edge's flood guard (500 requests/s per connection) once
    # a round trip takes under 4 ms, and B's refused answers would read as lost responses.
    # (A local subchannel pool each: channels to one address share a connection else.)
    own_connection = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    async with (
        grpc.aio.insecure_channel(edge, options=own_connection) as channel_a,
        grpc.aio.insecure_channel(edge, options=own_connection) as channel_b,
    ):
        agent_a, call_a = await _connect(channel_a, key_a, "bench-a")
        agent_b, call_b = await _connect(channel_b, key_b, "bench-b")
        answering = asyncio.create_task(_answer(channel_b, key_b, agent_b))
        messages = messaging_pb2_grpc.MessagingServiceStub(channel_a)
        meta_a = (("x-api-key", key_a),)

        async def request() -> None:
            if answering.done():
                raise RuntimeError(f"agent B stopped answering: {answering.exception()!r}")
            reply = await messages.SendRequest(
                messaging_pb2.SendRequestRequest(
                    to_agent=agent_b, correlation_id=uuid.uuid4().hex, timeout_ms=5000
                ),
                metadata=meta_a,
                timeout=CALL_TIMEOUT,
            )
            if reply.response.correlation_id != reply.request.correlation_id:
                raise RuntimeError("a response to another request")

        floor_channels = [
            grpc.aio.insecure_channel(edge, options=own_connection)
            for _ in range(FLOOR_CONNECTIONS)
        ]
        floor_stubs = itertools.cycle(auth_pb2_grpc.AuthServiceStub(c) for c in floor_channels)

        async def floor() -> None:
            await next(floor_stubs).GetMe(
                auth_pb2.GetMeRequest(), metadata=meta_a, timeout=CALL_TIMEOUT
            )

        results = []
        try:
            for name, call in (("unary_floor", floor), ("request_response", request)):
                started = time.monotonic()
                latencies, errors, first = await _timed(seconds, call)
                results.append(
                    CaseResult(
                        name=name,
                        requests=len(latencies),
                        errors=errors,
                        seconds=time.monotonic() - started,
                        p50_ms=_percentile(latencies, 0.5),
                        p99_ms=_percentile(latencies, 0.99),
                        first_error=first,
                    )
                )
        finally:
            for floor_channel in floor_channels:
                await floor_channel.close()
            answering.cancel()
            for stream in (call_a, call_b):
                stream.cancel()  # type: ignore[attr-defined]
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await answering
    return results


def run(settings: Settings) -> Report:
    with tempfile.TemporaryDirectory(prefix="agentmesh-bench-") as tmp:
        with MeshProcess(data_dir=Path(tmp), env=MESH_ENV) as mesh:
            cases = asyncio.run(_cases(mesh, settings.seconds))
    by_name = {c.name: c for c in cases}
    p50 = by_name["request_response"].p50_ms
    return Report(
        name=NAME,
        title="agent request/response round trip through Envoy, one request in flight",
        baseline=BASELINE,
        cases=cases,
        ratios=(("request_response", "unary_floor"),),
        notes=["a round trip is 2 sends (the response acknowledges the request) and 1 delivery"],
        count_label="round trips",
        latency_label="rtt",
        goals=(
            Goal(
                text=f"request/response p50 under {GOAL_P50_MS:g} ms",
                met=p50 is not None and p50 < GOAL_P50_MS,
            ),
        ),
    )
