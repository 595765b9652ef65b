"""Internal calls made in place (one process) answer as the same calls over gRPC do: the same
replies, status codes, messages and ErrorInfo reasons, deadlines, and the caller's request id
carried along. Each case runs against one servicer both ways: through a real grpc.aio server
with the mesh's interceptors, and through InternalChannel's local stub."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agentmesh.v1 import agents_pb2, agents_pb2_grpc
from servers.auth.keys import SigningKey
from servers.common import context as callctx
from servers.common import errors
from servers.common.auth import Authenticator, TokenVerifier
from servers.common.context import Principal
from servers.common.interceptors import default_interceptors
from servers.common.internal import InternalChannel
from tests.helpers import error_reason

TOKEN = "internal-secret"


class Directory(agents_pb2_grpc.AgentsInternalServiceServicer):
    """ResolveAgents answers by its key_id: an agent, a refusal, a crash, or a long wait."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    async def ResolveAgents(
        self, request: agents_pb2.ResolveAgentsRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.ResolveAgentsResponse:
        who = callctx.principal()
        self.seen.append((callctx.request_id(), who.kind if who else None))
        if request.key_id == "missing":
            raise errors.NotFound("no such agent", reason="AGENT_NOT_FOUND")
        if request.key_id == "broken":
            raise RuntimeError("a bug")
        if request.key_id == "slow":
            await asyncio.sleep(5)
        return agents_pb2.ResolveAgentsResponse(
            agents=[agents_pb2.AgentIdentity(agent_id="a-1", owner_id="u-1")]
        )


async def _no_keys(secret: str) -> Principal:
    raise errors.AuthRequired("invalid API key")


@pytest.fixture
async def channels(tmp_path: Path) -> AsyncIterator[tuple[Directory, dict[str, InternalChannel]]]:
    key = SigningKey.load_or_create(tmp_path)
    verifier = TokenVerifier(jwks=key.jwks, issuer="agentmesh", audience="agentmesh")
    auth = Authenticator(verifier=verifier, internal_token=TOKEN, api_keys=_no_keys)
    server = grpc.aio.server(interceptors=default_interceptors(auth))
    directory = Directory()
    agents_pb2_grpc.add_AgentsInternalServiceServicer_to_server(directory, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    remote = InternalChannel(address=lambda: f"127.0.0.1:{port}", internal_token=TOKEN)
    local = InternalChannel(
        address=lambda: "127.0.0.1:1",  # never dialled
        internal_token=TOKEN,
        local={"AgentsInternalService": directory},
    )
    try:
        yield directory, {"grpc": remote, "in place": local}
    finally:
        await remote.close()
        await server.stop(0)


async def _resolve(channel: InternalChannel, key_id: str, timeout: float = 5.0) -> object:
    stub = channel.stub(agents_pb2_grpc.AgentsInternalServiceStub)
    return await stub.ResolveAgents(
        agents_pb2.ResolveAgentsRequest(key_id=key_id), **channel.call_options(timeout)
    )


async def test_in_place_calls_answer_as_grpc_calls_do(
    channels: tuple[Directory, dict[str, InternalChannel]],
) -> None:
    directory, both = channels
    outcomes = {}
    for way, channel in both.items():
        reply = await _resolve(channel, "k-1")
        assert isinstance(reply, agents_pb2.ResolveAgentsResponse)
        assert [a.agent_id for a in reply.agents] == ["a-1"], way
        seen = []
        for key_id, timeout in (("missing", 5.0), ("broken", 5.0), ("slow", 0.2)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _resolve(channel, key_id, timeout)
            error = refused.value
            seen.append((error.code(), error.details(), error_reason(error)))
        outcomes[way] = seen
    assert outcomes["in place"] == outcomes["grpc"]
    assert [code for code, _, _ in outcomes["grpc"]] == [
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ]
    assert outcomes["grpc"][0][2] == "AGENT_NOT_FOUND"
    # Both ways the servicer ran as the mesh's own service principal.
    assert {kind for _, kind in directory.seen} == {"service"}


async def test_an_in_place_call_runs_apart_from_the_callers_state(
    channels: tuple[Directory, dict[str, InternalChannel]],
) -> None:
    directory, both = channels
    caller = callctx.CallState(method="/outer", request_id="rid-outer", via_gateway=True)
    caller.principal = Principal(subject="user-1", kind="user")
    token = callctx.enter_call(caller)
    try:
        await _resolve(both["in place"], "k-1")
        # The callee saw the caller's request id, under its own principal; the caller's
        # state is its own again afterwards.
        assert directory.seen[-1] == ("rid-outer", "service")
        assert callctx.current_call() is caller
        assert caller.principal.subject == "user-1" and caller.trailers == []
    finally:
        callctx.leave_call(token)
