"""ServiceServer's drain: health turns NOT_SERVING, in-flight calls finish, new ones are refused."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2 as grpc_health_pb2
from grpc_health.v1 import health_pb2_grpc as grpc_health_pb2_grpc

from agentmesh.v1 import health_pb2, health_pb2_grpc
from servers.common.server import PortInUse, ServiceServer


class Slow(health_pb2_grpc.HealthServiceServicer):
    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def GetLiveness(
        self, request: health_pb2.GetLivenessRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.GetLivenessResponse:
        self.entered.set()
        await asyncio.sleep(0.5)
        return health_pb2.GetLivenessResponse(status="alive")


def _server(servicer: Slow, port: int = 0) -> ServiceServer:
    return ServiceServer(
        "slow",
        host="127.0.0.1",
        port=port,
        interceptors=[],
        registrations=[lambda s: health_pb2_grpc.add_HealthServiceServicer_to_server(servicer, s)],
        services=["agentmesh.v1.HealthService"],
    )


async def test_drain_finishes_in_flight_calls_and_refuses_new_ones() -> None:
    servicer = Slow()
    server = _server(servicer)
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthServiceStub(channel)
        probe = grpc_health_pb2_grpc.HealthStub(channel)
        serving = await probe.Check(grpc_health_pb2.HealthCheckRequest(service=""))
        assert serving.status == grpc_health_pb2.HealthCheckResponse.SERVING

        in_flight = asyncio.ensure_future(stub.GetLiveness(health_pb2.GetLivenessRequest()))
        await servicer.entered.wait()
        await server.drain()
        draining = await probe.Check(grpc_health_pb2.HealthCheckRequest(service=""))
        assert draining.status == grpc_health_pb2.HealthCheckResponse.NOT_SERVING

        stopping = asyncio.ensure_future(server.stop(grace=5))
        assert (await in_flight).status == "alive"
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetLiveness(health_pb2.GetLivenessRequest(), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    await server.stop(grace=1)  # a second stop is harmless


async def test_taken_port_is_port_in_use() -> None:
    first = _server(Slow())
    port = await first.start()
    try:
        with pytest.raises(PortInUse):
            await _server(Slow(), port=port).start()
    finally:
        await first.stop(grace=0)
