"""TasksService and TasksInternalService: proto in, domain call, proto out.

The tasks service also speaks to the agents service (AgentsInternalService): it wakes agents
when work is queued, and tells an agent when a task it holds was cancelled, stopped or lost its
lease. Those calls are best effort: a missed wake-up costs the agents' next poll, a missed
cancellation is caught by the agent's next heartbeat (its lease is no longer renewed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

import grpc

from agentmesh.v1 import agents_pb2, agents_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from servers.common.clock import now, timestamp
from servers.common.context import require_principal, set_http_status
from servers.common.errors import Conflict, NotFound, Unavailable, ValidationError
from servers.common.internal import InternalChannel
from servers.common.metrics import Metrics
from servers.common.pagination import page
from servers.common.protos import as_json, struct

from .dispatch import Dispatch, Lost
from .domain import NewTask, Tasks, estimated_completion, priority_label
from .models import TaskRow

log = logging.getLogger("agentmesh.tasks")
SWEEP_SECONDS = 1.0
FIGURES_MAX_AGENTS = 100  # a page of agents


def task_proto(task: TaskRow) -> tasks_pb2.Task:
    return tasks_pb2.Task(
        task_id=task.task_id,
        id=task.task_id,
        type=task.type,
        title=task.title,
        description=task.description,
        status=task.status,
        priority=task.priority,
        priority_label=priority_label(task.priority),
        model=task.model,
        metadata=struct(task.task_metadata),
        required_capabilities=list(task.required_capabilities),
        progress=task.progress,
        assigned_agent=task.assigned_agent,
        attempt=task.attempt,
        max_attempts=task.max_attempts,
        timeout_seconds=task.timeout_seconds,
        result=struct(task.result) if task.result is not None else None,
        error=task.error,
        error_code=task.error_code,
        idempotency_key=task.idempotency_key or "",
        callback_url=task.callback_url,
        owner_id=task.owner_id,
        created_at=timestamp(task.created_at),
        updated_at=timestamp(task.updated_at),
        started_at=timestamp(task.started_at),
        completed_at=timestamp(task.completed_at),
        cancelled_at=timestamp(task.cancelled_at),
        estimated_completion=timestamp(estimated_completion(task)),
    )


class Agents:
    """The tasks service's calls to the agents service, best effort and in the background."""

    def __init__(self, channel: InternalChannel) -> None:
        self._channel = channel
        self._pending: set[asyncio.Task[None]] = set()

    def _spawn(self, call: Awaitable[object]) -> None:
        async def run() -> None:
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                log.info("agents service call failed: %s", exc.code().name)

        task = asyncio.ensure_future(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def tasks_available(self, task: TaskRow) -> None:
        if task.status != "queued":
            return
        stub = self._channel.stub(agents_pb2_grpc.AgentsInternalServiceStub)
        capabilities = list(task.required_capabilities) or [task.type]
        self._spawn(
            stub.NotifyTasksAvailable(
                agents_pb2.NotifyTasksAvailableRequest(capabilities=capabilities),
                **self._channel.call_options(),
            )
        )

    def cancel(
        self, agent_id: str, task_id: str, reason: str, attempt_token: str, *, message: str = ""
    ) -> None:
        """Tells the agent to stop the attempt with this token ("": whichever it runs);
        ``message``: a stopper's words, passed on."""
        if not agent_id:
            return
        stub = self._channel.stub(agents_pb2_grpc.AgentsInternalServiceStub)
        self._spawn(
            stub.DeliverCancellation(
                agents_pb2.DeliverCancellationRequest(
                    agent_id=agent_id,
                    task_id=task_id,
                    reason=reason,
                    attempt_token=attempt_token,
                    message=message,
                ),
                **self._channel.call_options(),
            )
        )

    async def count(self) -> tuple[int, int]:
        """(registered, online) agents, mesh-wide; Unavailable when the agents service does
        not answer."""
        stub = self._channel.stub(agents_pb2_grpc.AgentsInternalServiceStub)
        try:
            counted = await stub.CountAgents(
                agents_pb2.CountAgentsRequest(), **self._channel.call_options()
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                "the agents service did not answer", details={"code": exc.code().name}
            ) from None
        return counted.registered, counted.online

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        await self._channel.close()


class TasksService(tasks_pb2_grpc.TasksServiceServicer):
    def __init__(self, *, tasks: Tasks, agents: Agents) -> None:
        self._tasks = tasks
        self._agents = agents

    async def CreateTask(
        self, request: tasks_pb2.CreateTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.Task:
        new = NewTask(
            type=request.type,
            title=request.title,
            description=request.description,
            priority=request.priority if request.HasField("priority") else None,
            priority_label=request.priority_label,
            model=request.model,
            metadata=as_json(request.metadata, "metadata"),
            required_capabilities=list(request.required_capabilities),
            idempotency_key=request.idempotency_key,
            max_attempts=request.max_attempts if request.HasField("max_attempts") else None,
            callback_url=request.callback_url,
            defer_start=request.defer_start,
            timeout_seconds=(
                request.timeout_seconds if request.HasField("timeout_seconds") else None
            ),
        )
        task, created = await self._tasks.create(require_principal(), new)
        if created:
            self._agents.tasks_available(task)
        # A repeat with the same idempotency key created nothing: 200, not 201.
        await set_http_status(context, 201 if created else 200)
        return task_proto(task)

    async def ListTasks(
        self, request: tasks_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.ListTasksResponse:
        p = page(request.limit, request.offset)
        rows, total, read = await self._tasks.list(require_principal(), request.status, p)
        tasks, served = read.fit([task_proto(r) for r in rows])
        return tasks_pb2.ListTasksResponse(tasks=tasks, **served.fields(total))

    async def GetTask(
        self, request: tasks_pb2.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.Task:
        return task_proto(await self._tasks.get(require_principal(), request.task_id))

    async def GetTaskResult(
        self, request: tasks_pb2.GetTaskResultRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.GetTaskResultResponse:
        task = await self._tasks.result(require_principal(), request.task_id)
        return tasks_pb2.GetTaskResultResponse(
            task_id=task.task_id,
            type=task.type,
            status=task.status,
            result=struct(task.result) if task.result is not None else None,
            error=task.error,
            error_code=task.error_code,
            completed_at=timestamp(task.completed_at),
        )

    async def CancelTask(
        self, request: tasks_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.Task:
        task = await self._tasks.cancel(require_principal(), request.task_id)
        # Ending a task leaves its attempt token as it was: it names the attempt to stop.
        self._agents.cancel(
            task.assigned_agent, task.task_id, "CANCELLED", task.attempt_token or ""
        )
        return task_proto(task)

    async def StartTask(
        self, request: tasks_pb2.StartTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.StartTaskResponse:
        task = await self._tasks.start(require_principal(), request.task_id)
        self._agents.tasks_available(task)
        return tasks_pb2.StartTaskResponse(status="started", task=task_proto(task))

    async def StopTask(
        self, request: tasks_pb2.StopTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.StopTaskResponse:
        task = await self._tasks.stop(require_principal(), request.task_id, request.reason)
        self._agents.cancel(
            task.assigned_agent,
            task.task_id,
            "STOPPED",
            task.attempt_token or "",
            message=request.reason,
        )
        return tasks_pb2.StopTaskResponse(status="stopped", task=task_proto(task))

    async def GetStats(
        self, request: tasks_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.GetStatsResponse:
        stats = await self._tasks.stats(require_principal())
        return tasks_pb2.GetStatsResponse(
            total_tasks=stats.total,
            active_tasks=stats.active,
            completed_tasks=stats.completed,
            failed_tasks=stats.failed,
            average_completion_time=stats.average_completion_time,
            success_rate=stats.success_rate,
        )


def _assignment(task: TaskRow) -> tasks_pb2.Assignment:
    return tasks_pb2.Assignment(
        task=task_proto(task),
        attempt=task.attempt,
        lease_expires_at=timestamp(task.lease_expires_at),
        attempt_token=task.attempt_token or "",
    )


def _agent_id(value: str) -> str:
    if not value or len(value) > 64:
        raise ValidationError(
            "agent_id is required (at most 64 characters)", details={"field": "agent_id"}
        )
    return value


class TasksInternalService(tasks_pb2_grpc.TasksInternalServiceServicer):
    """Called by the agents service on behalf of connected agents."""

    def __init__(self, *, dispatch: Dispatch, agents: Agents, metrics: Metrics | None = None):
        self._dispatch = dispatch
        self._agents = agents
        self._metrics = metrics

    async def ClaimTask(
        self, request: tasks_pb2.ClaimTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.ClaimTaskResponse:
        if request.free_capacity < 1:
            return tasks_pb2.ClaimTaskResponse()
        task = await self._dispatch.claim(_agent_id(request.agent_id), request.capabilities)
        if task is None:
            return tasks_pb2.ClaimTaskResponse()
        return tasks_pb2.ClaimTaskResponse(assignment=_assignment(task))

    async def RenewLeases(
        self, request: tasks_pb2.RenewLeasesRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.RenewLeasesResponse:
        renewed, lost = await self._dispatch.renew(_agent_id(request.agent_id), request.task_ids)
        reply = tasks_pb2.RenewLeasesResponse(renewed_task_ids=renewed, lost_task_ids=lost)
        reply.lease_expires_at.FromDatetime(now() + self._dispatch.lease)
        return reply

    async def ReportProgress(
        self,
        request: tasks_pb2.TasksInternalServiceReportProgressRequest,
        context: grpc.aio.ServicerContext,
    ) -> tasks_pb2.TasksInternalServiceReportProgressResponse:
        task = await self._dispatch.progress(
            request.task_id,
            _agent_id(request.agent_id),
            request.attempt_token,
            request.progress,
            request.message,
        )
        if isinstance(task, str):
            status = {"status": task} if task else {}
            raise Conflict(
                "this attempt no longer holds the task",
                reason="LEASE_LOST",
                details={"task_id": request.task_id[:64]} | status,
            )
        return tasks_pb2.TasksInternalServiceReportProgressResponse(
            lease_expires_at=timestamp(task.lease_expires_at)
        )

    async def CompleteTask(
        self,
        request: tasks_pb2.TasksInternalServiceCompleteTaskRequest,
        context: grpc.aio.ServicerContext,
    ) -> tasks_pb2.TasksInternalServiceCompleteTaskResponse:
        error = None
        if request.HasField("error"):
            e = request.error
            error = (e.code or "INTERNAL_ERROR", e.message, e.retryable)
        agent_id = _agent_id(request.agent_id)
        claim_next = None
        if request.HasField("claim_next"):
            if request.claim_next.agent_id != agent_id:
                raise ValidationError(
                    "claim_next is for the agent that reports the outcome",
                    details={"field": "claim_next.agent_id"},
                )
            if request.claim_next.free_capacity >= 1:
                claim_next = list(request.claim_next.capabilities)
        outcome = await self._dispatch.complete(
            request.task_id,
            agent_id,
            request.attempt_token,
            result=as_json(request.result, "result") if request.HasField("result") else None,
            error=error,
            claim_next=claim_next,
        )
        if not outcome.accepted:
            if outcome.reason == "TASK_NOT_FOUND":
                raise NotFound(
                    "no such task",
                    reason="TASK_NOT_FOUND",
                    details={"task_id": request.task_id[:64]},
                )
            raise Conflict(
                "this attempt no longer holds the task",
                details={"task_id": request.task_id[:64], "status": outcome.status},
            )
        task = outcome.task or await self._dispatch.get(request.task_id)
        if task.status == "queued":
            self._agents.tasks_available(task)
        reply = tasks_pb2.TasksInternalServiceCompleteTaskResponse(task=task_proto(task))
        if outcome.next is not None:
            reply.next.CopyFrom(_assignment(outcome.next))
        return reply

    async def ReleaseAgentTasks(
        self, request: tasks_pb2.ReleaseAgentTasksRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.ReleaseAgentTasksResponse:
        reason = (request.reason or "AGENT_STOPPED")[:64]
        lost = await self._dispatch.release(_agent_id(request.agent_id), reason)
        await self._after_loss(lost, notify_holder=False)
        return tasks_pb2.ReleaseAgentTasksResponse(
            requeued_task_ids=[x.task_id for x in lost if x.requeued],
            failed_task_ids=[x.task_id for x in lost if not x.requeued],
        )

    async def ReturnTask(
        self, request: tasks_pb2.ReturnTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.ReturnTaskResponse:
        task_id = request.task_id
        if not task_id or len(task_id) > 64:
            raise ValidationError(
                "task_id is required (at most 64 characters)", details={"field": "task_id"}
            )
        task = await self._dispatch.give_back(
            task_id, _agent_id(request.agent_id), request.attempt_token[:64]
        )
        if task is not None:
            self._agents.tasks_available(task)
        return tasks_pb2.ReturnTaskResponse(returned=task is not None)

    async def GetAgentFigures(
        self, request: tasks_pb2.GetAgentFiguresRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.GetAgentFiguresResponse:
        ids = list(request.agent_ids)
        if len(ids) > FIGURES_MAX_AGENTS:
            raise ValidationError(
                f"at most {FIGURES_MAX_AGENTS} agent_ids",
                details={"field": "agent_ids", "max": FIGURES_MAX_AGENTS},
            )
        found = await self._dispatch.figures([_agent_id(i) for i in ids]) if ids else {}
        return tasks_pb2.GetAgentFiguresResponse(
            figures=[
                tasks_pb2.AgentFigures(
                    agent_id=agent_id, completed=done, failed=failed, average_duration=average
                )
                for agent_id, (done, failed, average) in sorted(found.items())
            ]
        )

    async def ListHeldTasks(
        self, request: tasks_pb2.ListHeldTasksRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.ListHeldTasksResponse:
        held = await self._dispatch.held_by(_agent_id(request.agent_id))
        return tasks_pb2.ListHeldTasksResponse(assignments=[_assignment(t) for t in held])

    async def _after_loss(self, lost: list[Lost], *, notify_holder: bool) -> None:
        for gone in lost:
            task = await self._dispatch.get(gone.task_id)
            if notify_holder:
                if task.status in ("queued", "failed"):
                    # Not claimed again yet: stop the attempt that lost its lease.
                    self._agents.cancel(
                        gone.agent_id, gone.task_id, gone.reason, gone.attempt_token
                    )
                elif task.assigned_agent != gone.agent_id:
                    # Claimed by another agent: the old holder stops whatever it runs of it.
                    self._agents.cancel(gone.agent_id, gone.task_id, "LEASE_LOST", "")
                # Claimed again by the same agent: its new assignment replaced the old attempt.
            if gone.requeued:
                self._agents.tasks_available(task)

    async def sweep(self) -> None:
        """Runs for the life of the server: expired leases go back to the queue (or fail)."""
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                lost: list[Lost] = await self._dispatch.expire_leases()
            except Exception:  # a database hiccup must not end the sweeper
                log.exception("lease sweep failed")
                continue
            if self._metrics is not None:
                for loss in lost:
                    if loss.reason == "TASK_TIMEOUT":
                        self._metrics.tasks_timed_out.inc()
                        continue
                    outcome = "requeued" if loss.requeued else "failed"
                    self._metrics.leases_expired.labels(outcome).inc()
            await self._after_loss(lost, notify_holder=True)
