"""MetricsService: seed 004's metrics document and the Prometheus text, served by the tasks
server. Task figures come from the tasks tables, agent figures from the agents service
(AgentsInternalService.CountAgents), the host's from /proc."""

from __future__ import annotations

import logging

import grpc
from google.api import httpbody_pb2

from agentmesh.v1 import metrics_pb2, metrics_pb2_grpc
from servers.common.errors import Unavailable
from servers.common.metrics import CONTENT_TYPE, Host, Metrics

from .domain import Tasks
from .service import Agents

log = logging.getLogger("agentmesh.tasks")
PROCESSING = ("assigned", "running")


class MetricsService(metrics_pb2_grpc.MetricsServiceServicer):
    def __init__(self, *, tasks: Tasks, agents: Agents, metrics: Metrics, host: Host) -> None:
        self._tasks = tasks
        self._agents = agents
        self._metrics = metrics
        self._host = host

    async def GetMetrics(
        self, request: metrics_pb2.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> metrics_pb2.GetMetricsResponse:
        figures = await self._tasks.figures()
        registered, online = await self._agents.count()
        host = self._host.usage()
        by_status = figures.by_status
        return metrics_pb2.GetMetricsResponse(
            system=metrics_pb2.SystemMetrics(
                cpu_usage=host.cpu_percent,
                memory_usage=host.memory_used_mib,
                memory_total=host.memory_total_mib,
                disk_usage=host.disk_percent,
            ),
            agents=metrics_pb2.AgentsMetrics(
                total=registered,
                active=online,
                tasks_queued=by_status["queued"],
                tasks_processing=sum(by_status[s] for s in PROCESSING),
                tasks_completed_today=figures.completed_today,
            ),
            performance=metrics_pb2.PerformanceMetrics(
                # Unrounded, as the stats are: a no-op task runs for well under a millisecond.
                average_task_duration=figures.average_seconds,
                p95_task_duration=figures.p95_seconds,
                error_rate=figures.error_rate,
            ),
        )

    async def GetPrometheusMetrics(
        self, request: metrics_pb2.GetPrometheusMetricsRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        for status, count in (await self._tasks.by_status()).items():
            self._metrics.tasks.labels(status).set(count)
        try:
            registered, online = await self._agents.count()
        except Unavailable:
            # A scrape still gets the rest; stale agent figures would mislead, absent ones not.
            log.warning("metrics: the agents service did not answer; agents left out")
            self._metrics.agents.clear()
        else:
            self._metrics.agents.labels("registered").set(registered)
            self._metrics.agents.labels("online").set(online)
        return httpbody_pb2.HttpBody(content_type=CONTENT_TYPE, data=self._metrics.render())
