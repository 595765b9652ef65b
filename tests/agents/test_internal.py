"""AgentsInternalService over a real gRPC server (without the mesh's interceptors, which
tests/common and tests/e2e cover): cancellations name their attempt, and ResolveAgents."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agentmesh.v1 import agents_pb2, agents_pb2_grpc
from servers.agents.domain import AgentDirectory
from servers.agents.service import AgentsInternalService
from servers.agents.signals import Signals
from servers.auth.keys import SigningKey
from servers.common.auth import INTERNAL_HEADER, Authenticator, TokenVerifier
from servers.common.context import Principal
from servers.common.db import Database
from servers.common.errors import AuthRequired
from servers.common.interceptors import default_interceptors
from tests.agents.test_directory import directory, session
from tests.helpers import error_reason
from tests.tasks.test_domain import _db

INTERNAL = "internal-secret"
CREDENTIAL = ((INTERNAL_HEADER, INTERNAL),)


@pytest.fixture
async def agents(database_url: str) -> AsyncIterator[tuple[AgentDirectory, Database]]:
    db = await _db(database_url)
    yield directory(db), db
    await db.close()


async def _no_keys(secret: str) -> Principal:
    raise AuthRequired("no API keys here")


@pytest.fixture
async def stub(
    agents: tuple[AgentDirectory, Database], tmp_path: Path
) -> AsyncIterator[agents_pb2_grpc.AgentsInternalServiceStub]:
    """The internal service behind the mesh's interceptors."""
    verifier = TokenVerifier(
        jwks=SigningKey.load_or_create(tmp_path).jwks, issuer="agentmesh", audience="agentmesh"
    )
    auth = Authenticator(verifier=verifier, internal_token=INTERNAL, api_keys=_no_keys)
    server = grpc.aio.server(interceptors=default_interceptors(auth))
    agents_pb2_grpc.add_AgentsInternalServiceServicer_to_server(
        AgentsInternalService(
            directory=agents[0],
            signals=Signals(agents[0].registry, read_configuration=agents[0].configuration),
        ),
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield agents_pb2_grpc.AgentsInternalServiceStub(channel)
    await channel.close()
    await server.stop(None)


async def test_a_cancellation_drops_only_the_attempt_it_names(
    agents: tuple[AgentDirectory, Database], stub: agents_pb2_grpc.AgentsInternalServiceStub
) -> None:
    directory_, _ = agents
    live = session()
    await directory_.connect(live, {})
    live.held.update({"t1": "attempt-2", "t2": "attempt-1"})

    async def cancel(task_id: str, token: str) -> agents_pb2.Cancellation:
        await stub.DeliverCancellation(
            agents_pb2.DeliverCancellationRequest(
                agent_id=live.agent_id, task_id=task_id, reason="LEASE_LOST", attempt_token=token
            ),
            metadata=CREDENTIAL,
        )
        frame = live.outbox.get_nowait()
        assert frame is not None
        return frame.cancellation

    # An older attempt's cancellation reaches the agent (which ignores it) but the newer
    # attempt stays held.
    sent = await cancel("t1", "attempt-1")
    assert (sent.task_id, sent.reason, sent.attempt_token) == ("t1", "LEASE_LOST", "attempt-1")
    assert live.held == {"t1": "attempt-2", "t2": "attempt-1"}
    assert (await cancel("t1", "attempt-2")).attempt_token == "attempt-2"
    assert live.held == {"t2": "attempt-1"}
    assert (await cancel("t2", "")).attempt_token == ""
    assert live.held == {}


async def test_cancelling_for_an_agent_that_is_not_connected(
    agents: tuple[AgentDirectory, Database], stub: agents_pb2_grpc.AgentsInternalServiceStub
) -> None:
    directory_, _ = agents
    live = session()
    await directory_.connect(live, {})
    directory_.registry.remove(live)
    await directory_.disconnect(live, "DISCONNECTED")
    # Known but offline: nothing to deliver now, and no error.
    await stub.DeliverCancellation(
        agents_pb2.DeliverCancellationRequest(agent_id=live.agent_id, task_id="t", reason="X"),
        metadata=CREDENTIAL,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeliverCancellation(
            agents_pb2.DeliverCancellationRequest(agent_id="nobody", task_id="t", reason="X"),
            metadata=CREDENTIAL,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(err.value) == "NOT_FOUND"


async def test_resolve_agents_by_id_and_by_key(
    agents: tuple[AgentDirectory, Database], stub: agents_pb2_grpc.AgentsInternalServiceStub
) -> None:
    directory_, _ = agents
    live, gone = session("a"), session("b")
    for one in (live, gone):
        await directory_.connect(one, {})
    directory_.registry.remove(gone)
    await directory_.disconnect(gone, "DISCONNECTED")
    by_id = await stub.ResolveAgents(
        agents_pb2.ResolveAgentsRequest(agent_ids=[live.agent_id, gone.agent_id, "unknown"]),
        metadata=CREDENTIAL,
    )
    by_key = await stub.ResolveAgents(
        agents_pb2.ResolveAgentsRequest(key_id="key-of-alice"), metadata=CREDENTIAL
    )
    for reply in (by_id, by_key):
        assert sorted((a.name, a.online, a.owner_id, a.key_id) for a in reply.agents) == [
            ("a", True, "alice", "key-of-alice"),
            ("b", False, "alice", "key-of-alice"),
        ]


async def test_resolve_agents_limits(stub: agents_pb2_grpc.AgentsInternalServiceStub) -> None:
    for request in (
        agents_pb2.ResolveAgentsRequest(agent_ids=[f"id-{i}" for i in range(101)]),
        agents_pb2.ResolveAgentsRequest(),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ResolveAgents(request, metadata=CREDENTIAL)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(err.value) == "VALIDATION_ERROR"
    # Only mesh services may ask.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ResolveAgents(
            agents_pb2.ResolveAgentsRequest(key_id="k"),
            metadata=((INTERNAL_HEADER, "a guess"),),
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
