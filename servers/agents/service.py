"""AgentsService.Connect (the agent stream that replaces the seed documents' WebSockets), the
registry of connected agents over REST (list, get, configure), and AgentsInternalService. The
HTTP-only agent RPCs (register, heartbeat, progress, complete, the SSE assignment stream) answer
UNIMPLEMENTED until they are built.

One Connect stream runs three things: a reader of the agent's frames (heartbeats renew leases,
progress and results go to the tasks service), a dispatcher that claims tasks while the agent has
free capacity and sleeps until woken (NotifyTasksAvailable) or a short poll, and the writer below
that sends the queued frames and pings the agent when it is quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format

from agentmesh.v1 import (
    agents_pb2,
    agents_pb2_grpc,
    common_pb2,
    tasks_pb2,
    tasks_pb2_grpc,
)
from servers.common.context import Principal, require_principal
from servers.common.errors import NotFound, ValidationError
from servers.common.internal import InternalChannel
from servers.common.pagination import page
from servers.common.protos import struct

from .registry import Registry, Session

log = logging.getLogger("agentmesh.agents")

HELLO_TIMEOUT = 10.0
POLL_SECONDS = 2.0
MAX_CAPACITY = 1000
AGENT_IDS = uuid.UUID("6f1d3c2e-8a4b-4c55-9d0e-2b7f4a1c9e10")
# Seed 004's words; only connected agents are known in this version, so "offline" lists none.
STATUS_WORDS = ("idle", "active", "busy", "overloaded", "offline")
CONFIG_MAX_BYTES = 64 * 1024


def agent_id_of(owner_id: str, name: str) -> str:
    """Stable per owner and name, so an agent keeps its id across reconnections."""
    return str(uuid.uuid5(AGENT_IDS, f"{owner_id}/{name}"))


def _error(code: str, message: str) -> agents_pb2.ConnectResponse:
    return agents_pb2.ConnectResponse(error=common_pb2.StreamError(code=code, message=message))


def _cancellation(task_id: str, reason: str) -> agents_pb2.ConnectResponse:
    return agents_pb2.ConnectResponse(
        cancellation=agents_pb2.Cancellation(task_id=task_id, reason=reason)
    )


def _check_hello(hello: agents_pb2.Hello) -> str:
    """What is wrong with a Hello, or ""."""
    if not 1 <= len(hello.name) <= 64:
        return "name must be 1-64 characters"
    if not hello.capabilities or len(hello.capabilities) > 32:
        return "capabilities: 1 to 32"
    if any(not 1 <= len(c) <= 64 for c in hello.capabilities):
        return "each capability must be 1-64 characters"
    if not 0 <= hello.max_capacity <= MAX_CAPACITY:
        return f"max_capacity must be 1 to {MAX_CAPACITY}"
    return ""


class AgentsService(agents_pb2_grpc.AgentsServiceServicer):
    def __init__(
        self,
        *,
        registry: Registry,
        tasks: InternalChannel,
        heartbeat_seconds: int,
        lease_seconds: int,
    ) -> None:
        self._registry = registry
        self._channel = tasks
        self._heartbeat = heartbeat_seconds
        self._lease = lease_seconds

    @property
    def _tasks(self) -> tasks_pb2_grpc.TasksInternalServiceStub:
        return self._channel.stub(tasks_pb2_grpc.TasksInternalServiceStub)

    async def Connect(
        self,
        request_iterator: AsyncIterator[agents_pb2.ConnectRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[agents_pb2.ConnectResponse]:
        who = require_principal()
        frames = aiter(request_iterator)
        try:
            first = await asyncio.wait_for(anext(frames), HELLO_TIMEOUT)
        except (StopAsyncIteration, TimeoutError):
            yield _error("VALIDATION_ERROR", "the first frame must be a Hello")
            return
        problem = _check_hello(first.hello) if first.HasField("hello") else "first frame: Hello"
        if problem:
            yield _error("VALIDATION_ERROR", problem)
            return
        session = self._open(who, first.hello)
        yield agents_pb2.ConnectResponse(
            welcome=agents_pb2.Welcome(
                agent_id=session.agent_id,
                heartbeat_interval_seconds=self._heartbeat,
                lease_duration_seconds=self._lease,
                configuration=struct(session.configuration),
            )
        )
        reader = asyncio.create_task(self._read(session, frames))
        dispatcher = asyncio.create_task(self._dispatch(session))
        try:
            while True:
                try:
                    frame = await asyncio.wait_for(session.outbox.get(), self._heartbeat)
                except TimeoutError:
                    if time.monotonic() - session.last_seen > 3 * self._heartbeat:
                        yield _error("HEARTBEAT_TIMEOUT", "no frame from the agent in time")
                        return
                    ping = agents_pb2.Ping(nonce=uuid.uuid4().hex)
                    ping.time.GetCurrentTime()
                    yield agents_pb2.ConnectResponse(ping=ping)
                    continue
                if frame is None:  # the reader ended: the agent closed its side, or it broke
                    if session.closed_by_agent:
                        await self._release(session)
                    return
                yield frame
                if frame.HasField("error") or frame.HasField("end"):
                    return
        finally:
            reader.cancel()
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, dispatcher, return_exceptions=True)
            self._registry.remove(session)
            log.info("agent disconnected", extra={"agent_id": session.agent_id})

    def _open(self, who: Principal, hello: agents_pb2.Hello) -> Session:
        agent_id = agent_id_of(who.subject, hello.name)
        session = Session(
            agent_id=agent_id,
            owner_id=who.subject,
            name=hello.name,
            type=hello.type,
            capabilities=frozenset(hello.capabilities),
            capacity=hello.max_capacity or 1,
            configuration=apply_config(
                json_format.MessageToDict(hello.configuration),
                self._registry.overrides.get(agent_id, {}),
            ),
            version=hello.version,
        )
        replaced = self._registry.add(session)
        if replaced is not None:
            replaced.send(agents_pb2.ConnectResponse(end=common_pb2.StreamEnd(reason="REPLACED")))
        log.info("agent connected", extra={"agent_id": session.agent_id, "agent_name": hello.name})
        return session

    async def _read(
        self, session: Session, frames: AsyncIterator[agents_pb2.ConnectRequest]
    ) -> None:
        try:
            async for frame in frames:
                session.seen()
                kind = frame.WhichOneof("kind")
                if kind == "heartbeat":
                    await self._renew(session, list(frame.heartbeat.task_ids))
                elif kind == "progress":
                    await self._progress(session, frame.progress)
                elif kind == "result":
                    await self._result(session, frame.result)
                elif kind == "hello":
                    session.send(_error("VALIDATION_ERROR", "Hello may only come first"))
                    return
            session.closed_by_agent = True
        except grpc.aio.AioRpcError:
            pass  # the agent's side broke; the writer ends the stream
        finally:
            session.send(None)

    async def _renew(self, session: Session, task_ids: list[str]) -> None:
        held = sorted(set(task_ids) | set(session.held))
        if not held:
            return
        try:
            reply = await self._tasks.RenewLeases(
                tasks_pb2.RenewLeasesRequest(agent_id=session.agent_id, task_ids=held),
                **self._channel.call_options(),
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("lease renewal failed: %s", exc.code().name)
            return
        for task_id in reply.lost_task_ids:
            session.held.pop(task_id, None)
            session.send(_cancellation(task_id, "LEASE_LOST"))
        if reply.lost_task_ids:
            session.wake.set()

    async def _progress(self, session: Session, progress: agents_pb2.TaskProgress) -> None:
        try:
            await self._tasks.ReportProgress(
                tasks_pb2.TasksInternalServiceReportProgressRequest(
                    task_id=progress.task_id,
                    agent_id=session.agent_id,
                    attempt_token=progress.attempt_token,
                    progress=progress.progress,
                    message=progress.message,
                ),
                **self._channel.call_options(),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND):
                session.held.pop(progress.task_id, None)
                session.send(_cancellation(progress.task_id, "LEASE_LOST"))
                session.wake.set()

    async def _result(self, session: Session, result: agents_pb2.TaskResult) -> None:
        request = tasks_pb2.TasksInternalServiceCompleteTaskRequest(
            task_id=result.task_id, agent_id=session.agent_id, attempt_token=result.attempt_token
        )
        if result.HasField("error"):
            request.error.CopyFrom(result.error)
        else:
            request.result.CopyFrom(result.result)
        ack = agents_pb2.TaskResultAck(task_id=result.task_id, attempt_token=result.attempt_token)
        try:
            reply = await self._tasks.CompleteTask(request, **self._channel.call_options())
            ack.accepted, ack.status = True, reply.task.status
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                ack.reason = "TASK_NOT_FOUND"
            elif exc.code() == grpc.StatusCode.ABORTED:
                ack.reason = "CONFLICT"
            else:
                # Not recorded and not refused: no ack, so the agent sends it again later.
                log.warning("could not record a result: %s", exc.code().name)
                return
        if session.held.get(result.task_id) == result.attempt_token:
            del session.held[result.task_id]
        session.send(agents_pb2.ConnectResponse(result_ack=ack))
        session.wake.set()

    async def _release(self, session: Session) -> None:
        try:
            await self._tasks.ReleaseAgentTasks(
                tasks_pb2.ReleaseAgentTasksRequest(
                    agent_id=session.agent_id, reason="AGENT_STOPPED"
                ),
                **self._channel.call_options(),
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("could not release a stopped agent's tasks: %s", exc.code().name)

    def _silent(self, session: Session) -> bool:
        return time.monotonic() - session.last_seen > 1.5 * self._heartbeat

    async def _dispatch(self, session: Session) -> None:
        """Claims work while the agent has room; sleeps until woken, or a short poll."""
        while True:
            session.wake.clear()
            # A frozen or cut-off agent still has a session until the writer notices; it must
            # not be handed the work whose lease it just lost.
            while session.free() > 0 and not self._silent(session):
                try:
                    reply = await self._tasks.ClaimTask(
                        tasks_pb2.ClaimTaskRequest(
                            agent_id=session.agent_id,
                            capabilities=sorted(session.capabilities),
                            free_capacity=session.free(),
                        ),
                        **self._channel.call_options(),
                    )
                except grpc.aio.AioRpcError as exc:
                    log.warning("claim failed: %s", exc.code().name)
                    break
                if not reply.HasField("assignment"):
                    break
                assignment = reply.assignment
                session.held[assignment.task.task_id] = assignment.attempt_token
                if not session.send(agents_pb2.ConnectResponse(assignment=assignment)):
                    return  # the agent is not reading; its lease will run out
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.wake.wait(), POLL_SECONDS)

    def _visible(self, agent_id: str) -> Session:
        who = require_principal()
        session = self._registry.get(agent_id)
        if session is None or not (session.owner_id == who.subject or "admin" in who.roles):
            raise NotFound("no such agent", details={"agent_id": agent_id[:64]})
        return session

    async def ListAgents(
        self, request: agents_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.ListAgentsResponse:
        who = require_principal()
        if request.status and request.status not in STATUS_WORDS:
            raise ValidationError(
                f"status must be one of {', '.join(STATUS_WORDS)}", details={"field": "status"}
            )
        p = page(request.limit, request.offset)
        wanted = set(request.capabilities)
        mine = [
            s
            for s in self._registry.all()
            if (s.owner_id == who.subject or "admin" in who.roles) and wanted <= s.capabilities
        ]
        matching = sorted(
            (s for s in mine if not request.status or s.status() == request.status),
            key=lambda s: (s.name, s.agent_id),
        )
        idle = sum(1 for s in matching if s.status() == "idle")
        return agents_pb2.ListAgentsResponse(
            agents=[agent_proto(s) for s in matching[p.offset : p.offset + p.limit]],
            **p.fields(len(matching)),
            active=len(matching),
            idle=idle,
            busy=len(matching) - idle,
        )

    async def GetAgent(
        self, request: agents_pb2.GetAgentRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.Agent:
        return agent_proto(self._visible(request.agent_id))

    async def UpdateAgentConfig(
        self, request: agents_pb2.UpdateAgentConfigRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.UpdateAgentConfigResponse:
        session = self._visible(request.agent_id)
        body = json_format.MessageToDict(request.configuration)
        if len(json.dumps(body).encode()) > CONFIG_MAX_BYTES:
            raise ValidationError(
                "configuration is larger than 64 KiB", details={"field": "configuration"}
            )
        paths = list(request.update_mask.paths)
        if any(not path or "." in path for path in paths if path != "*"):
            raise ValidationError(
                "update_mask paths are top-level keys", details={"field": "update_mask"}
            )
        if "*" in paths:
            changes: dict[str, Any] = {k: None for k in session.configuration} | body
        elif paths:
            changes = {path: body.get(path) for path in paths}
        else:
            changes = body
        session.configuration = apply_config(session.configuration, changes)
        overrides = self._registry.overrides.setdefault(session.agent_id, {})
        overrides.update(changes)
        updated = sorted(changes)
        config = struct(session.configuration)
        session.send(
            agents_pb2.ConnectResponse(
                config_update=agents_pb2.ConfigUpdate(configuration=config, updated_fields=updated)
            )
        )
        return agents_pb2.UpdateAgentConfigResponse(
            agent_id=session.agent_id, updated_fields=updated, configuration=config
        )


def apply_config(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Sets the changed keys; a None (JSON null) removes the key."""
    merged = dict(base)
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def agent_proto(session: Session) -> agents_pb2.Agent:
    now = time.time()
    agent = agents_pb2.Agent(
        agent_id=session.agent_id,
        name=session.name,
        type=session.type,
        status=session.status(),
        capabilities=sorted(session.capabilities),
        current_load=len(session.held),
        max_capacity=session.capacity,
        configuration=struct(session.configuration),
        owner_id=session.owner_id,
        version=session.version,
        health=agents_pb2.AgentHealth(
            status="healthy", uptime_seconds=int(now - session.connected_at)
        ),
    )
    agent.health.last_heartbeat.FromSeconds(int(session.last_seen_at))
    agent.connected_at.FromSeconds(int(session.connected_at))
    return agent


class AgentsInternalService(agents_pb2_grpc.AgentsInternalServiceServicer):
    def __init__(self, *, registry: Registry) -> None:
        self._registry = registry

    async def DeliverCancellation(
        self, request: agents_pb2.DeliverCancellationRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.DeliverCancellationResponse:
        session = self._registry.get(request.agent_id)
        if session is None:
            raise NotFound("agent is not connected here", details={"agent_id": request.agent_id})
        session.held.pop(request.task_id, None)
        session.send(_cancellation(request.task_id, request.reason or "CANCELLED"))
        session.wake.set()
        return agents_pb2.DeliverCancellationResponse()

    async def NotifyTasksAvailable(
        self, request: agents_pb2.NotifyTasksAvailableRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.NotifyTasksAvailableResponse:
        self._registry.wake(set(request.capabilities))
        return agents_pb2.NotifyTasksAvailableResponse()
