"""MetricsService: seed 004's metrics document, the Prometheus text and seed 001's
observability endpoints, served by the tasks server. Task figures come from the tasks tables,
agent figures from the agents service (AgentsInternalService.CountAgents), the host's from
/proc, the observability figures from the process's own record (observability.py)."""

from __future__ import annotations

import json
import logging
import time

import grpc
from google.api import httpbody_pb2
from google.protobuf import json_format

from agentmesh.v1 import metrics_pb2, metrics_pb2_grpc
from servers.common.errors import Unavailable, ValidationError
from servers.common.metrics import CONTENT_TYPE, Host, Metrics
from servers.common.observability import OBSERVED, Observed

from .domain import Tasks
from .service import Agents

log = logging.getLogger("agentmesh.tasks")
PROCESSING = ("assigned", "running")
TRACES_DEFAULT, TRACES_MAX = 50, 100
INT32_MAX = 2**31 - 1


class MetricsService(metrics_pb2_grpc.MetricsServiceServicer):
    def __init__(
        self,
        *,
        tasks: Tasks,
        agents: Agents,
        metrics: Metrics,
        host: Host,
        observed: Observed = OBSERVED,
    ) -> None:
        self._tasks = tasks
        self._agents = agents
        self._metrics = metrics
        self._host = host
        self._observed = observed

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
        return httpbody_pb2.HttpBody(content_type=CONTENT_TYPE, data=await self.prometheus())

    async def prometheus(self) -> bytes:
        """The process's metrics, with the mesh-wide gauges read now (also the text of this
        process's own metrics port, servers/common/scrape.py)."""
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
        return self._metrics.render()

    async def GetObservabilityMetrics(
        self,
        request: metrics_pb2.GetObservabilityMetricsRequest,
        context: grpc.aio.ServicerContext,
    ) -> metrics_pb2.GetObservabilityMetricsResponse:
        seen = self._observed
        calls = seen.calls
        db, external = seen.statements, seen.external
        events = seen.events
        return metrics_pb2.GetObservabilityMetricsResponse(
            traces=metrics_pb2.TraceFigures(
                total=_int32(calls),
                error_rate=seen.server_errors / calls if calls else 0.0,
                average_latency=1000 * seen.call_seconds / calls if calls else 0.0,
            ),
            spans=metrics_pb2.SpanFigures(
                total=_int32(calls + db + external),
                db_spans=_int32(db),
                external_spans=_int32(external),
            ),
            events=metrics_pb2.EventFigures(
                total=_int32(sum(events.values())),
                agent_events=_int32(events["agent"]),
                task_events=_int32(events["task"]),
            ),
        )

    async def ListActiveTraces(
        self, request: metrics_pb2.ListActiveTracesRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        if not 0 <= request.limit <= TRACES_MAX:
            raise ValidationError(
                f"limit must be between 1 and {TRACES_MAX}",
                details={"field": "limit", "max": TRACES_MAX},
            )
        at = time.perf_counter()
        traces = []
        for record in self._observed.active(request.limit or TRACES_DEFAULT):
            trace = metrics_pb2.Trace(
                trace_id=record.trace_id,
                span_id=record.span_id,
                operation_name=record.operation,
                duration=1000 * record.duration(at),
                tags={
                    "rpc": record.method,
                    "status": record.status,
                    "request_id": record.request_id,
                },
            )
            trace.start_time.FromMicroseconds(round(record.started_at * 1e6))
            if user := record.user:
                trace.tags["user_id"] = user
            traces.append(json_format.MessageToDict(trace, preserving_proto_field_name=True))
        return httpbody_pb2.HttpBody(
            content_type="application/json", data=json.dumps(traces, separators=(",", ":")).encode()
        )


def _int32(count: int) -> int:
    """A count as the contract's int32: it saturates rather than wrap."""
    return min(count, INT32_MAX)
