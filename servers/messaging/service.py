"""MessagingService and EventsService. Declared in the contract; built in the messaging-and-events
issue, until which every RPC answers UNIMPLEMENTED."""

from __future__ import annotations

from agentmesh.v1 import events_pb2_grpc, messaging_pb2_grpc


class MessagingService(messaging_pb2_grpc.MessagingServiceServicer):
    pass


class EventsService(events_pb2_grpc.EventsServiceServicer):
    pass
