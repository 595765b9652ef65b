"""ServiceServer: its drain (health turns NOT_SERVING, in-flight calls finish, new ones are refused)
and the ports it binds."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2 as grpc_health_pb2
from grpc_health.v1 import health_pb2_grpc as grpc_health_pb2_grpc

from agentmesh.v1 import health_pb2, health_pb2_grpc
from servers.common import server as server_module
from servers.common.jobs import stop_jobs
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


def _server(servicer: Slow, port: int = 0, avoid: frozenset[int] = frozenset()) -> ServiceServer:
    return ServiceServer(
        "slow",
        host="127.0.0.1",
        port=port,
        avoid=avoid,
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


async def test_a_picked_port_is_never_one_to_avoid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel soon offers a port that was just released again: the mesh's public port, for
    one, is free until Envoy binds it. A server told to avoid it takes the next offer."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        public = held.getsockname()[1]
    offers = iter([public, public])
    real = socket.socket

    class Probe:
        def __init__(self, family: int, kind: int) -> None:
            self._sock = real(family, kind)

        def __enter__(self) -> Probe:
            return self

        def __exit__(self, *exc: object) -> None:
            self._sock.close()

        def bind(self, address: tuple[str, int]) -> None:
            self._sock.bind((address[0], next(offers, 0)))

        def getsockname(self) -> tuple[str, int]:
            host, port = self._sock.getsockname()
            return str(host), int(port)

    monkeypatch.setattr(server_module.socket, "socket", Probe)
    server = _server(Slow(), avoid=frozenset({public}))
    try:
        port = await server.start()
    finally:
        monkeypatch.undo()
        await server.stop(grace=0)
    assert port != public and port != 0


async def _swallows_its_first_cancellation(stopped: asyncio.Event) -> None:
    """A job whose first cancellation is caught below it and its loop goes on, as SQLAlchemy's
    asyncpg adapter does when the cancellation lands while it closes a connection."""
    swallowed = False
    try:
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True
    finally:
        stopped.set()


async def _stubborn(released: asyncio.Event) -> None:
    """Swallows every cancellation until released."""
    while not released.is_set():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)


async def test_stopping_does_not_hang_on_a_job_that_outlives_its_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stopped = asyncio.Event()
    server = ServiceServer(
        "jobs",
        host="127.0.0.1",
        port=0,
        avoid=frozenset(),
        interceptors=[],
        registrations=[],
        services=[],
        background=[lambda: _swallows_its_first_cancellation(stopped)],
    )
    await server.start()
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await asyncio.wait_for(server.stop(grace=5), 3)
    assert stopped.is_set() and time.monotonic() - started < 2
    assert "cancelled again" in caplog.text

    # One that does not stop is left behind once the patience is spent; stopping goes on.
    released = asyncio.Event()
    stubborn = asyncio.ensure_future(_stubborn(released))
    await asyncio.sleep(0.1)  # running: a task cancelled before its first step just ends
    started = time.monotonic()
    await stop_jobs([stubborn], patience=1.0)
    assert not stubborn.done() and 0.9 < time.monotonic() - started < 2
    assert "left behind" in caplog.text
    released.set()
    await asyncio.wait_for(stubborn, 1)
