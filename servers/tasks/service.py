"""TasksService and TasksInternalService. Declared in the contract; built in the tasks-and-agents
issue, until which every RPC answers UNIMPLEMENTED (HTTP 501 NOT_IMPLEMENTED through Envoy)."""

from __future__ import annotations

from agentmesh.v1 import tasks_pb2_grpc


class TasksService(tasks_pb2_grpc.TasksServiceServicer):
    pass


class TasksInternalService(tasks_pb2_grpc.TasksInternalServiceServicer):
    pass
