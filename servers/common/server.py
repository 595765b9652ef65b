"""Building, starting and draining one service's grpc.aio server."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .jobs import stop_jobs

log = logging.getLogger("agentmesh.server")

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# Keepalive pings detect half-open connections hop by hop; clients may ping every 10 s.
BIND_ATTEMPTS = 20
SERVER_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
)


class PortInUse(RuntimeError):
    """The address to listen on is taken."""


Registration = Callable[[grpc.aio.Server], None]


class ServiceServer:
    """One service on its own port: its servicers, grpc.health.v1, reflection, and background
    jobs (e.g. the lease sweeper) that run while it serves.

    ``services`` are the full names this server answers for; grpc.health.v1 reports each (and
    the overall "" entry) SERVING after start and NOT_SERVING from the start of a drain.
    """

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int,
        interceptors: Iterable[grpc.aio.ServerInterceptor],
        registrations: Iterable[Registration],
        services: Iterable[str],
        background: Iterable[Callable[[], Awaitable[None]]] = (),
        avoid: Collection[int] = (),
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self._avoid = frozenset(avoid)
        self.services = tuple(services)
        self.health = health.aio.HealthServicer()
        self._server = grpc.aio.server(interceptors=list(interceptors), options=SERVER_OPTIONS)
        for register in registrations:
            register(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (
                *self.services,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self._server,
        )
        self._background = list(background)
        self._running: list[asyncio.Future[None]] = []
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> int:
        """Binds (port 0 picks a free one, never one of ``avoid``), starts, and returns the
        bound port."""
        bound = self._bind(self.port) if self.port or not self._avoid else self._bind_free()
        if not bound:
            raise PortInUse(f"{self.name}: cannot listen on {self.host}:{self.port}")
        self.port = bound
        await self._server.start()
        for service in ("", *self.services):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._running = [asyncio.ensure_future(job()) for job in self._background]
        log.info("listening", extra={"service": self.name, "address": self.address})
        return bound

    def _bind(self, port: int) -> int:
        """The port bound, or 0 when it could not be."""
        try:
            return int(self._server.add_insecure_port(f"{self.host}:{port}"))
        except RuntimeError:
            return 0

    def _bind_free(self) -> int:
        """A free port outside ``avoid``: one the kernel offers, bound right after (another
        process may take it in between; then the next one)."""
        for _ in range(BIND_ATTEMPTS):
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((self.host, 0))
                offered = int(probe.getsockname()[1])
            if offered not in self._avoid and (bound := self._bind(offered)):
                return bound
        return 0

    async def drain(self) -> None:
        """Tells health checkers to stop sending new calls here."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """Refuses new calls and lets in-flight ones finish for up to ``grace`` seconds."""
        if self._stopped:
            return
        self._stopped = True
        await self.drain()
        await stop_jobs(self._running, patience=grace)
        await self._server.stop(grace)
