"""MessagingService: proto in, domain call, proto out. The contract is messaging.proto."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from google.api import httpbody_pb2

from agentmesh.v1 import common_pb2, messaging_pb2, messaging_pb2_grpc
from servers.common import sse
from servers.common.auth import Authenticator, current_call_check
from servers.common.clock import timestamp
from servers.common.context import current_call, require_principal, set_http_status
from servers.common.pagination import page
from servers.common.protos import as_json, struct
from servers.common.slots import StreamSlots

from .domain import Messages, NewMessage, check, check_timeout
from .models import MessageRow
from .resolver import AgentResolver
from .stream import Ended, Failed, Frame, InboxStream, Ping

# Envoy tells upstreams its route timeout (65 s for MessagingService); a SendRequest through it
# stops waiting this long before, so that the caller gets this server's 504 rather than Envoy's.
# Native gRPC callers through Envoy count too: Envoy passes their longer deadlines on as is.
ENVOY_TIMEOUT_HEADER = "x-envoy-expected-rq-timeout-ms"
GATEWAY_MARGIN = 5.0
# Left of the caller's own deadline for answering once the wait is over.
DEADLINE_MARGIN = 0.05
SSE_RETRY_MS = 1000
# Inbox streams one agent may hold open in one process; one more is 429 RATE_LIMIT_EXCEEDED.
INBOX_STREAMS_PER_AGENT = 4


def message_proto(row: MessageRow) -> messaging_pb2.AgentMessage:
    return messaging_pb2.AgentMessage(
        message_id=row.message_id,
        from_agent=row.from_agent,
        to_agent=row.to_agent,
        type=row.type,
        payload=struct(row.payload),
        timestamp=timestamp(row.created_at),
        correlation_id=row.correlation_id,
        ttl_seconds=row.ttl_seconds,
        expires_at=timestamp(row.expires_at),
        acked_at=timestamp(row.acked_at),
    )


def _remaining(context: grpc.aio.ServicerContext) -> float | None:
    left = context.time_remaining()
    return None if left is None else max(0.0, left)


def _heartbeat(frame: Ping) -> common_pb2.Heartbeat:
    beat = common_pb2.Heartbeat()
    beat.time.FromDatetime(frame.at)
    return beat


class MessagingService(messaging_pb2_grpc.MessagingServiceServicer):
    def __init__(
        self,
        *,
        messages: Messages,
        resolver: AgentResolver,
        heartbeat_seconds: float,
        closing: asyncio.Event,
        inbox_streams_per_agent: int = INBOX_STREAMS_PER_AGENT,
        authenticator: Authenticator | None = None,
    ) -> None:
        self._messages = messages
        # Checks again, every heartbeat interval, the credential an open stream came with.
        self._authenticator = authenticator
        self._directory = resolver
        self._heartbeat = heartbeat_seconds
        self._closing = closing
        # Each open inbox stream reads ahead up to a page of messages (as large as 256 KiB
        # each): a bound per agent, since an agent needs one, two while it reconnects.
        self._slots = StreamSlots(inbox_streams_per_agent, "inbox streams per agent")

    async def SendMessage(
        self, request: messaging_pb2.SendMessageRequest, context: grpc.aio.ServicerContext
    ) -> messaging_pb2.AgentMessage:
        new = check(
            NewMessage(
                message_id=request.message_id,
                to_agent=request.to_agent,
                type=request.type,
                payload=as_json(request.payload, "payload"),
                correlation_id=request.correlation_id,
                ttl_seconds=request.ttl_seconds,
            )
        )
        sender, recipient = await self._directory.sender_and_recipient(
            require_principal(), request.from_agent, new.to_agent, timeout=_remaining(context)
        )
        row, created = await self._messages.send(sender, recipient, new)
        # A repeat of a message_id sent nothing: 200, not 201.
        await set_http_status(context, 201 if created else 200)
        return message_proto(row)

    async def SendRequest(
        self, request: messaging_pb2.SendRequestRequest, context: grpc.aio.ServicerContext
    ) -> messaging_pb2.SendRequestResponse:
        wait = check_timeout(request.timeout_ms)
        new = check(
            NewMessage(
                message_id=request.message_id,
                to_agent=request.to_agent,
                type="request",
                payload=as_json(request.payload, "payload"),
                correlation_id=request.correlation_id,
                ttl_seconds=request.ttl_seconds,
            )
        )
        sender, recipient = await self._directory.sender_and_recipient(
            require_principal(), request.from_agent, new.to_agent, timeout=_remaining(context)
        )
        call = current_call()
        envoy_ms = call.metadata.get(ENVOY_TIMEOUT_HEADER, "") if call is not None else ""
        if envoy_ms.isdigit() and int(envoy_ms) > 0:
            wait = min(wait, max(0.0, int(envoy_ms) / 1000 - GATEWAY_MARGIN))
        left = _remaining(context)
        if left is not None:
            wait = min(wait, max(0.0, left - DEADLINE_MARGIN))
        sent, response = await self._messages.request(sender, recipient, new, wait=wait)
        return messaging_pb2.SendRequestResponse(
            request=message_proto(sent), response=message_proto(response)
        )

    async def AckMessage(
        self, request: messaging_pb2.AckMessageRequest, context: grpc.aio.ServicerContext
    ) -> messaging_pb2.AgentMessage:
        mine = await self._directory.mine(require_principal(), timeout=_remaining(context))
        row = await self._messages.ack({a.agent_id for a in mine}, request.message_id)
        return message_proto(row)

    async def ListInbox(
        self, request: messaging_pb2.ListInboxRequest, context: grpc.aio.ServicerContext
    ) -> messaging_pb2.ListInboxResponse:
        p = page(request.limit, request.offset)
        agent = await self._directory.own(
            require_principal(), request.agent_id, timeout=_remaining(context)
        )
        rows, total, read = await self._messages.inbox(
            agent.agent_id, unacked=request.unacked, page=p
        )
        messages, served = read.fit([message_proto(r) for r in rows])
        return messaging_pb2.ListInboxResponse(messages=messages, **served.fields(total))

    async def _open(self, agent_id: str, context: grpc.aio.ServicerContext) -> InboxStream:
        agent = await self._directory.own(
            require_principal(), agent_id, timeout=_remaining(context)
        )
        return InboxStream(
            self._messages,
            agent.agent_id,
            heartbeat=self._heartbeat,
            closing=self._closing,
            credential=current_call_check(self._authenticator),
        )

    async def StreamInbox(
        self, request: messaging_pb2.StreamInboxRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[messaging_pb2.StreamInboxResponse]:
        inbox = await self._open(request.agent_id, context)
        with self._slots.take(inbox.agent_id):
            async for frame in inbox.frames():
                yield _grpc_frame(frame)

    async def StreamInboxSse(
        self, request: messaging_pb2.StreamInboxSseRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        inbox = await self._open(request.agent_id, context)
        with self._slots.take(inbox.agent_id):
            yield sse.body(sse.retry(SSE_RETRY_MS))
            async for frame in inbox.frames():
                yield sse.body(_sse_frame(frame))


def _stream_error(frame: Failed) -> common_pb2.StreamError:
    return common_pb2.StreamError(code=frame.code, message=frame.message, details=frame.details)


def _grpc_frame(frame: Frame) -> messaging_pb2.StreamInboxResponse:
    if isinstance(frame, Ping):
        return messaging_pb2.StreamInboxResponse(heartbeat=_heartbeat(frame))
    if isinstance(frame, Failed):
        return messaging_pb2.StreamInboxResponse(error=_stream_error(frame))
    if isinstance(frame, Ended):
        return messaging_pb2.StreamInboxResponse(end=common_pb2.StreamEnd(reason=frame.reason))
    return messaging_pb2.StreamInboxResponse(message=message_proto(frame))


def _sse_frame(frame: Frame) -> str:
    if isinstance(frame, Ping):
        return sse.frame("ping", _heartbeat(frame))
    if isinstance(frame, Failed):
        error = common_pb2.StreamError(
            code=frame.code, message=frame.message, details=frame.details
        )
        return sse.frame("error", error)
    if isinstance(frame, Ended):
        return sse.frame("end", common_pb2.StreamEnd(reason=frame.reason))
    return sse.frame("message", message_proto(frame), event_id=frame.message_id)
