"""TasksService: proto in, domain call, proto out. TasksInternalService (assignment, leases,
results from agents) is the tasks-and-agents issue's and answers UNIMPLEMENTED until then."""

from __future__ import annotations

import grpc
from google.protobuf import json_format, struct_pb2

from agentmesh.v1 import tasks_pb2, tasks_pb2_grpc
from servers.common.clock import timestamp
from servers.common.context import Principal, principal, set_http_status
from servers.common.errors import AuthRequired
from servers.common.pagination import page

from .domain import NewTask, Tasks, priority_label
from .models import TaskRow


def _struct(value: dict[str, object] | None) -> struct_pb2.Struct | None:
    if value is None:
        return None
    out = struct_pb2.Struct()
    out.update(value)
    return out


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
        metadata=_struct(task.task_metadata),
        required_capabilities=list(task.required_capabilities),
        progress=task.progress,
        assigned_agent=task.assigned_agent,
        attempt=task.attempt,
        max_attempts=task.max_attempts,
        result=_struct(task.result),
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
    )


def _caller() -> Principal:
    who = principal()
    if who is None:  # the policy table guarantees one; this guards a wrong table
        raise AuthRequired("authentication required")
    return who


class TasksService(tasks_pb2_grpc.TasksServiceServicer):
    def __init__(self, *, tasks: Tasks) -> None:
        self._tasks = tasks

    async def CreateTask(
        self, request: tasks_pb2.CreateTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.Task:
        new = NewTask(
            type=request.type,
            title=request.title,
            description=request.description,
            priority=request.priority,
            priority_label=request.priority_label,
            model=request.model,
            metadata=json_format.MessageToDict(request.metadata),
            required_capabilities=list(request.required_capabilities),
            idempotency_key=request.idempotency_key,
            max_attempts=request.max_attempts,
            callback_url=request.callback_url,
            defer_start=request.defer_start,
        )
        task, created = await self._tasks.create(_caller(), new)
        # A repeat with the same idempotency key created nothing: 200, not 201.
        await set_http_status(context, 201 if created else 200)
        return task_proto(task)

    async def ListTasks(
        self, request: tasks_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.ListTasksResponse:
        p = page(request.limit, request.offset)
        rows, total = await self._tasks.list(_caller(), request.status, p)
        return tasks_pb2.ListTasksResponse(
            tasks=[task_proto(r) for r in rows],
            total=total,
            limit=p.limit,
            offset=p.offset,
            has_more=p.has_more(total),
        )

    async def GetTask(
        self, request: tasks_pb2.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.Task:
        return task_proto(await self._tasks.get(_caller(), request.task_id))

    async def GetTaskResult(
        self, request: tasks_pb2.GetTaskResultRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.GetTaskResultResponse:
        task = await self._tasks.result(_caller(), request.task_id)
        return tasks_pb2.GetTaskResultResponse(
            task_id=task.task_id,
            type=task.type,
            status=task.status,
            result=_struct(task.result),
            error=task.error,
            error_code=task.error_code,
            completed_at=timestamp(task.completed_at),
        )

    async def CancelTask(
        self, request: tasks_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.Task:
        return task_proto(await self._tasks.cancel(_caller(), request.task_id))

    async def StartTask(
        self, request: tasks_pb2.StartTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.StartTaskResponse:
        await self._tasks.start(_caller(), request.task_id)
        return tasks_pb2.StartTaskResponse(status="started")

    async def StopTask(
        self, request: tasks_pb2.StopTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.StopTaskResponse:
        await self._tasks.stop(_caller(), request.task_id)
        return tasks_pb2.StopTaskResponse(status="stopped")

    async def GetStats(
        self, request: tasks_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.GetStatsResponse:
        stats = await self._tasks.stats(_caller())
        return tasks_pb2.GetStatsResponse(
            total_tasks=stats.total,
            active_tasks=stats.active,
            completed_tasks=stats.completed,
            failed_tasks=stats.failed,
            average_completion_time=stats.average_completion_time,
            success_rate=stats.success_rate,
        )


class TasksInternalService(tasks_pb2_grpc.TasksInternalServiceServicer):
    pass
