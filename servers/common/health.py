"""agentmesh.v1.HealthService: the documented /health, /health/live and /health/ready."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import grpc
import redis.asyncio as redis
from grpc_health.v1 import health_pb2 as grpc_health_pb2
from grpc_health.v1 import health_pb2_grpc as grpc_health_pb2_grpc

from agentmesh.v1 import health_pb2, health_pb2_grpc

from .context import set_http_status
from .db import Database
from .peers import open_channel

CHECK_TIMEOUT = 1.0


class HealthService(health_pb2_grpc.HealthServiceServicer):
    """Checks the database, Redis when configured, and each service's grpc.health.v1."""

    def __init__(
        self,
        *,
        db: Database,
        version: str,
        peers: Mapping[str, str],
        redis_url: str | None = None,
    ) -> None:
        self._db = db
        self._version = version
        # Kept by reference: the mesh fills it in as its servers bind their ports.
        self._peers = peers
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._started = time.monotonic()
        self._redis = redis.from_url(redis_url) if redis_url else None

    def _stub(self, name: str) -> grpc_health_pb2_grpc.HealthStub:
        channel = self._channels.get(name)
        if channel is None:
            channel = open_channel(self._peers[name])
            self._channels[name] = channel
        return grpc_health_pb2_grpc.HealthStub(channel)

    async def _peer_up(self, name: str) -> bool:
        try:
            reply = await self._stub(name).Check(
                grpc_health_pb2.HealthCheckRequest(service=""), timeout=CHECK_TIMEOUT
            )
        except grpc.RpcError:
            return False
        return reply.status == grpc_health_pb2.HealthCheckResponse.SERVING

    async def _db_up(self) -> bool:
        try:
            return await asyncio.wait_for(self._db.ping(), CHECK_TIMEOUT * 3)
        except TimeoutError:
            return False

    async def _redis_up(self) -> bool:
        if self._redis is None:
            return True
        try:
            return bool(await asyncio.wait_for(self._redis.ping(), CHECK_TIMEOUT))
        except (TimeoutError, redis.RedisError, OSError):
            return False

    async def GetHealth(
        self, request: health_pb2.GetHealthRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.GetHealthResponse:
        names = list(self._peers)
        results = await asyncio.gather(
            self._db_up(), self._redis_up(), *(self._peer_up(n) for n in names)
        )
        services = {"database": results[0], **dict(zip(names, results[2:], strict=True))}
        if self._redis is not None:
            services["redis"] = results[1]
        reply = health_pb2.GetHealthResponse(
            status="healthy" if all(services.values()) else "degraded",
            version=self._version,
            uptime=int(time.monotonic() - self._started),
            services={k: "up" if v else "down" for k, v in services.items()},
        )
        reply.timestamp.GetCurrentTime()
        return reply

    async def GetLiveness(
        self, request: health_pb2.GetLivenessRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.GetLivenessResponse:
        return health_pb2.GetLivenessResponse(status="alive")

    async def GetReadiness(
        self, request: health_pb2.GetReadinessRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.GetReadinessResponse:
        db_up, redis_up = await asyncio.gather(self._db_up(), self._redis_up())
        failing = [name for name, up in (("database", db_up), ("redis", redis_up)) if not up]
        if failing:
            await set_http_status(context, 503)
            return health_pb2.GetReadinessResponse(status="not ready", failing=failing)
        return health_pb2.GetReadinessResponse(status="ready")

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
