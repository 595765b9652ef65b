"""HealthService: readiness follows the database; REST gets 503 through x-http-status."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from agentmesh.v1 import health_pb2, health_pb2_grpc
from servers.common.db import Database
from servers.common.health import HealthService

Serve = Callable[[str], Awaitable[health_pb2_grpc.HealthServiceStub]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts HealthService servers on a database URL; stops them all afterwards."""
    started: list[tuple[grpc.aio.Server, HealthService, Database]] = []
    channels: list[grpc.aio.Channel] = []

    async def start(url: str) -> health_pb2_grpc.HealthServiceStub:
        db = Database(url)
        service = HealthService(db=db, version="test", peers={})
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        started.append((server, service, db))
        channels.append(channel := grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        return health_pb2_grpc.HealthServiceStub(channel)

    yield start
    for channel in channels:
        await channel.close()
    for server, service, db in started:
        await server.stop(None)
        await service.close()
        await db.close()


async def test_ready_with_a_database(serve: Serve, tmp_path: Path) -> None:
    stub = await serve(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    call = stub.GetReadiness(health_pb2.GetReadinessRequest(), timeout=10)
    reply = await call
    assert reply.status == "ready" and list(reply.failing) == []
    assert "x-http-status" not in dict(await call.initial_metadata())


async def test_not_ready_without_the_database(serve: Serve) -> None:
    stub = await serve("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    call = stub.GetReadiness(health_pb2.GetReadinessRequest(), timeout=10)
    reply = await call
    assert reply.status == "not ready"
    assert list(reply.failing) == ["database"]
    assert dict(await call.initial_metadata())["x-http-status"] == "503"
    health = await stub.GetHealth(health_pb2.GetHealthRequest(), timeout=10)
    assert health.status == "degraded" and health.services["database"] == "down"
