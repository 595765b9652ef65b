"""AgentsService and AgentsInternalService. Declared in the contract; built in the
tasks-and-agents issue, until which every RPC answers UNIMPLEMENTED."""

from __future__ import annotations

from agentmesh.v1 import agents_pb2_grpc


class AgentsService(agents_pb2_grpc.AgentsServiceServicer):
    pass


class AgentsInternalService(agents_pb2_grpc.AgentsInternalServiceServicer):
    pass
