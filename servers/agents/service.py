"""AgentsService: the agent worker's side, over Connect (the bidirectional stream that replaces
the seed documents' WebSockets) or, for agents that speak only HTTP, over RegisterAgent,
Heartbeat, ReportProgress, CompleteTask and the StreamAssignments SSE stream; the agent registry
over REST (list, get, configure); and AgentsInternalService.

Every agent that ever connected or registered has a row in agents_agents (domain.py says when it
counts as online, and how an agent whose server died is set offline); reads merge the row with
the live session when the agent is connected here.

Both kinds of agent run on the same pieces: a Session in the registry, a dispatcher that claims
tasks while the agent has free capacity (and is heard from) and sleeps until woken
(NotifyTasksAvailable) or a short poll, a writer that sends the queued frames and pings the agent
when it is quiet, and one way each of renewing leases and forwarding progress and results to
the tasks service. A Connect stream is its session: the reader of the agent's frames feeds those.
An HTTP agent's session outlives its SSE streams (registry.py): the unary calls feed the same
pieces, and the dispatcher runs while a stream is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from google.api import httpbody_pb2
from google.protobuf import json_format
from sqlalchemy.exc import SQLAlchemyError

from agentmesh.v1 import (
    agents_pb2,
    agents_pb2_grpc,
    common_pb2,
    tasks_pb2,
    tasks_pb2_grpc,
)
from servers.common import sse
from servers.common.clock import timestamp
from servers.common.context import Principal, require_principal, set_http_status
from servers.common.errors import Conflict, NotFound, Unavailable, ValidationError
from servers.common.internal import CALL_TIMEOUT, InternalChannel
from servers.common.pagination import page
from servers.common.protos import struct

from . import http
from .domain import AgentDirectory, View, config_too_large
from .registry import Session

log = logging.getLogger("agentmesh.agents")

HELLO_TIMEOUT = 10.0
POLL_SECONDS = 2.0
MAX_CAPACITY = 1000
AGENT_IDS = uuid.UUID("6f1d3c2e-8a4b-4c55-9d0e-2b7f4a1c9e10")
# The agent is silent (no frame, no REST call) for this many heartbeat intervals: no new work
# for it; for three, its stream ends (HEARTBEAT_TIMEOUT) and an HTTP agent's session expires.
SILENT_INTERVALS = 3


def agent_id_of(owner_id: str, name: str) -> str:
    """Stable per owner and name, so an agent keeps its id across reconnections."""
    return str(uuid.uuid5(AGENT_IDS, f"{owner_id}/{name}"))


def _error(code: str, message: str) -> agents_pb2.ConnectResponse:
    return agents_pb2.ConnectResponse(error=common_pb2.StreamError(code=code, message=message))


def _end(reason: str) -> agents_pb2.ConnectResponse:
    return agents_pb2.ConnectResponse(end=common_pb2.StreamEnd(reason=reason))


def _last(frame: agents_pb2.ConnectResponse) -> bool:
    return frame.HasField("error") or frame.HasField("end")


def _cancellation(task_id: str, reason: str, attempt_token: str = "") -> agents_pb2.ConnectResponse:
    return agents_pb2.ConnectResponse(
        cancellation=agents_pb2.Cancellation(
            task_id=task_id, reason=reason, attempt_token=attempt_token
        )
    )


def hello_problem(hello: agents_pb2.Hello) -> tuple[str, str] | None:
    """What is wrong with a Hello (or a registration): (field, message), or None."""
    if not 1 <= len(hello.name) <= 64:
        return "name", "name must be 1-64 characters"
    if not hello.capabilities or len(hello.capabilities) > 32:
        return "capabilities", "capabilities: 1 to 32"
    if any(not 1 <= len(c) <= 64 for c in hello.capabilities):
        return "capabilities", "each capability must be 1-64 characters"
    if not 0 <= hello.max_capacity <= MAX_CAPACITY:
        return "max_capacity", f"max_capacity must be 1 to {MAX_CAPACITY}"
    if len(hello.type) > 64 or len(hello.version) > 64:
        return "type", "type and version: at most 64 characters each"
    if config_too_large(json_format.MessageToDict(hello.configuration)):
        return "configuration", "configuration is larger than 64 KiB"
    return None


def _timeout(context: grpc.aio.ServicerContext) -> float:
    """The caller's remaining deadline, for the call to the tasks service made on its behalf."""
    left = context.time_remaining()
    return CALL_TIMEOUT if left is None else max(0.1, min(CALL_TIMEOUT, left))


class AgentsService(agents_pb2_grpc.AgentsServiceServicer):
    def __init__(
        self,
        *,
        directory: AgentDirectory,
        tasks: InternalChannel,
        heartbeat_seconds: int,
        lease_seconds: int,
        closing: asyncio.Event | None = None,
    ) -> None:
        self._directory = directory
        self._registry = directory.registry
        self._channel = tasks
        self._heartbeat = heartbeat_seconds
        self._lease = lease_seconds
        # Set when the server starts to stop: open streams end with StreamEnd SERVER_SHUTDOWN.
        self._closing = closing or asyncio.Event()
        # New HTTP sessions (registration, a rebuilt session, a new stream) one at a time, so
        # that two calls at once make one session. They are rare: once per start or stream.
        self._attaching = asyncio.Lock()

    @property
    def _tasks(self) -> tasks_pb2_grpc.TasksInternalServiceStub:
        return self._channel.stub(tasks_pb2_grpc.TasksInternalServiceStub)

    # -- Connect ----------------------------------------------------------------------------

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
        problem = (
            hello_problem(first.hello) if first.HasField("hello") else ("", "first frame: Hello")
        )
        if problem:
            yield _error("VALIDATION_ERROR", problem[1])
            return
        try:
            session = await self._open(who, first.hello)
        except SQLAlchemyError as exc:
            log.warning("could not record an agent's connection: %s", exc)
            yield _error("SERVICE_UNAVAILABLE", "the agent registry is unavailable; reconnect")
            return
        reason = "DISCONNECTED"
        reader = asyncio.create_task(self._read(session, frames))
        dispatcher = asyncio.create_task(self._dispatch(session))
        closer = asyncio.create_task(self._end_on_close(session))
        try:
            yield agents_pb2.ConnectResponse(
                welcome=agents_pb2.Welcome(
                    agent_id=session.agent_id,
                    heartbeat_interval_seconds=self._heartbeat,
                    lease_duration_seconds=self._lease,
                    configuration=struct(session.configuration),
                )
            )
            while True:
                frame = await self._next(session)
                if frame is None:  # the reader ended: the agent closed its side, or it broke
                    if session.closed_by_agent:
                        reason = "AGENT_STOPPED"
                        await self._release(session)
                    return
                yield frame
                if _last(frame):
                    reason = frame.error.code if frame.HasField("error") else frame.end.reason
                    return
        finally:
            for job in (reader, dispatcher, closer):
                job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, dispatcher, closer, return_exceptions=True)
            self._registry.remove(session)
            # An outcome being recorded goes on (it may lease the next task); then what this
            # stream never wrote goes back to the queue rather than waiting out its lease.
            if session.recording is not None:
                await asyncio.wait({session.recording}, timeout=CALL_TIMEOUT)
            await self._give_back(session, session.unsent_assignments())
            await self._directory.disconnect(session, reason)
            log.info("agent disconnected", extra={"agent_id": session.agent_id})

    async def _read(
        self, session: Session, frames: AsyncIterator[agents_pb2.ConnectRequest]
    ) -> None:
        try:
            async for frame in frames:
                session.seen()
                kind = frame.WhichOneof("kind")
                if kind == "heartbeat":
                    # Also the tasks handed out on this stream that the agent has not listed
                    # yet: they may still wait in its queue.
                    await self._renew_streamed(
                        session, sorted(set(frame.heartbeat.task_ids) | set(session.held))
                    )
                elif kind == "progress":
                    try:
                        await self._progress(session, frame.progress)
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND):
                            session.send(_cancellation(frame.progress.task_id, "LEASE_LOST"))
                elif kind == "result":
                    # Shielded: once the outcome is sent, its answer and the next task leased
                    # with it are seen to even if the stream ends meanwhile.
                    session.recording = asyncio.ensure_future(
                        self._on_result(session, frame.result)
                    )
                    await asyncio.shield(session.recording)
                elif kind == "hello":
                    session.send(_error("VALIDATION_ERROR", "Hello may only come first"))
                    return
            session.closed_by_agent = True
        except grpc.aio.AioRpcError:
            pass  # the agent's side broke; the writer ends the stream
        finally:
            session.send(None)

    async def _on_result(self, session: Session, result: agents_pb2.TaskResult) -> None:
        ack, following = await self._result(session, result)
        if ack is not None:
            session.send(agents_pb2.ConnectResponse(result_ack=ack))
        if following is not None:
            await self._hand_out(session, following)

    async def _renew_streamed(self, session: Session, task_ids: list[str]) -> None:
        try:
            reply = await self._renew(session, task_ids)
        except grpc.aio.AioRpcError as exc:
            log.warning("lease renewal failed: %s", exc.code().name)
            return
        for task_id in reply.lost_task_ids:
            session.send(_cancellation(task_id, "LEASE_LOST"))

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

    # -- what Connect and HTTP agents share -------------------------------------------------

    async def _open(
        self, who: Principal, hello: agents_pb2.Hello, *, over_http: bool = False
    ) -> Session:
        """A Hello or a registration: the agent's session, recorded online."""
        configuration = json_format.MessageToDict(hello.configuration)
        session = Session(
            agent_id=agent_id_of(who.subject, hello.name),
            owner_id=who.subject,
            key_id=who.token_id,
            name=hello.name,
            type=hello.type,
            capabilities=frozenset(hello.capabilities),
            capacity=hello.max_capacity or 1,
            configuration=configuration,
            version=hello.version,
            defaults=configuration,
            http=over_http,
        )
        await self._take_over(session)
        log.info("agent connected", extra={"agent_id": session.agent_id, "agent_name": hello.name})
        return session

    async def _take_over(self, session: Session) -> None:
        """Records the session online with its effective configuration and puts it in the
        registry. The session it replaces here ends with REPLACED; an HTTP session takes over
        the work of the one it replaces, to repeat it to its stream."""
        replaced = await self._directory.connect(session, session.defaults)
        if replaced is not None:
            if session.http:
                session.adopt(replaced)
            replaced.send(_end("REPLACED"))

    async def _renew(
        self, session: Session, task_ids: list[str], timeout: float = CALL_TIMEOUT
    ) -> tasks_pb2.RenewLeasesResponse:
        """Renews the leases of these tasks. Renewed ones count as held (also those assigned
        before a reconnection, whose token this session never knew); lost ones no longer."""
        if not task_ids:
            return tasks_pb2.RenewLeasesResponse()
        reply = await self._tasks.RenewLeases(
            tasks_pb2.RenewLeasesRequest(agent_id=session.agent_id, task_ids=task_ids),
            **self._channel.call_options(timeout),
        )
        for task_id in reply.renewed_task_ids:
            session.held.setdefault(task_id, "")
        for task_id in reply.lost_task_ids:
            session.drop(task_id)
        if reply.lost_task_ids:
            session.wake.set()
        return reply

    async def _progress(
        self, session: Session, progress: agents_pb2.TaskProgress, timeout: float = CALL_TIMEOUT
    ) -> tasks_pb2.TasksInternalServiceReportProgressResponse:
        """Forwards progress (which renews the lease). When the attempt is no longer current
        the task stops counting as held, and the tasks service's error is raised."""
        try:
            return await self._tasks.ReportProgress(
                tasks_pb2.TasksInternalServiceReportProgressRequest(
                    task_id=progress.task_id,
                    agent_id=session.agent_id,
                    attempt_token=progress.attempt_token,
                    progress=progress.progress,
                    message=progress.message,
                ),
                **self._channel.call_options(timeout),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND):
                session.drop(progress.task_id, progress.attempt_token)
                session.wake.set()
            raise

    async def _result(
        self, session: Session, result: agents_pb2.TaskResult, timeout: float = CALL_TIMEOUT
    ) -> tuple[agents_pb2.TaskResultAck | None, tasks_pb2.Assignment | None]:
        """Forwards an outcome. Returns the ack, accepted or refused, or None when it was
        neither recorded nor refused (the tasks service is away), so the agent sends it again;
        and the agent's next assignment, leased with the outcome, for ``_hand_out``."""
        request = tasks_pb2.TasksInternalServiceCompleteTaskRequest(
            task_id=result.task_id, agent_id=session.agent_id, attempt_token=result.attempt_token
        )
        if result.HasField("error"):
            request.error.CopyFrom(result.error)
        else:
            request.result.CopyFrom(result.result)
        # The slot this outcome frees is refilled in the same transaction: only a slot this
        # session counts, while a stream is open to hand the next task to, and once per task
        # (an HTTP agent may send the same outcome twice at once). The slot stays reserved
        # until the answer is in, so the dispatcher never claims it too.
        refill = (
            bool(result.attempt_token)
            and session.held.get(result.task_id) in ("", result.attempt_token)
            and result.task_id not in session.refilling
            and session.dispatching
            and self._may_claim(session)
        )
        if refill:
            request.claim_next.agent_id = session.agent_id
            request.claim_next.capabilities.extend(sorted(session.capabilities))
            request.claim_next.free_capacity = 1
            session.refilling.add(result.task_id)
        ack = agents_pb2.TaskResultAck(task_id=result.task_id, attempt_token=result.attempt_token)
        following: tasks_pb2.Assignment | None = None
        try:
            reply = await self._tasks.CompleteTask(request, **self._channel.call_options(timeout))
            ack.accepted, ack.status = True, reply.task.status
            if reply.HasField("next"):
                following = reply.next
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                ack.reason = "TASK_NOT_FOUND"
            elif exc.code() == grpc.StatusCode.ABORTED:
                ack.reason = "CONFLICT"
            else:
                log.warning("could not record a result: %s", exc.code().name)
                return None, None
        finally:
            if refill:
                session.refilling.discard(result.task_id)
        if result.attempt_token:
            session.drop(result.task_id, result.attempt_token)
        if following is not None:
            # Held in the freed slot at once, before anything else runs: the dispatcher must
            # not see the slot free and claim it a second time.
            session.hold(following)
        session.wake.set()
        return ack, following

    async def _dispatch(self, session: Session) -> None:
        """Claims work while the agent has room; sleeps until woken, or a short poll."""
        session.dispatching = True
        try:
            await self._claim_while_room(session)
        finally:
            session.dispatching = session.claiming = False

    async def _claim_while_room(self, session: Session) -> None:
        while True:
            session.wake.clear()
            # A frozen or cut-off agent still has a session until the writer notices; it must
            # not be handed the work whose lease it just lost. Nor a replaced session.
            while session.free() > 0 and self._may_claim(session):
                session.claiming = True
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
                finally:
                    session.claiming = False
                if not reply.HasField("assignment"):
                    break
                if not await self._hand_out(session, reply.assignment):
                    return  # replaced, ended, or not reading: the task went back
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_SECONDS):
                    await session.wake.wait()

    def _may_claim(self, session: Session) -> bool:
        """Whether work may be claimed for the session: a frozen or cut-off agent still has
        one until the writer notices, and must not be handed the work whose lease it just
        lost; nor may a replaced session."""
        return not self._registry.quiet(session) and self._registry.get(session.agent_id) is session

    async def _hand_out(self, session: Session, assignment: tasks_pb2.Assignment) -> bool:
        """Gives the agent a task leased to it. False when the session can take no more: it
        ended or was replaced while the task was being leased, or the agent does not keep up
        with its stream; the task is then handed back."""
        session.last_claimed = time.monotonic()
        if self._registry.get(session.agent_id) is not session:
            await self._give_back(session, [assignment])
            return False
        session.hold(assignment)
        if not session.send(agents_pb2.ConnectResponse(assignment=assignment)):
            await self._give_back(session, [assignment])
            return False
        if session.free() == 0 and session.overload_armed:
            try:
                await self._directory.overloaded(session)
            except SQLAlchemyError as exc:
                log.warning("could not record agent.overloaded: %s", exc)
        return True

    async def _give_back(self, session: Session, assignments: list[tasks_pb2.Assignment]) -> None:
        """Hands back leases whose assignments never reached the agent: their tasks are queued
        again at once, the attempts not counted, instead of waiting out their leases."""
        for assignment in assignments:
            task_id, token = assignment.task.task_id, assignment.attempt_token
            session.drop(task_id, token)
            try:
                await self._tasks.ReturnTask(
                    tasks_pb2.ReturnTaskRequest(
                        task_id=task_id, agent_id=session.agent_id, attempt_token=token
                    ),
                    **self._channel.call_options(),
                )
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "could not hand back an undelivered task (its lease will run out): %s",
                    exc.code().name,
                )

    async def _next(self, session: Session) -> agents_pb2.ConnectResponse | None:
        """The next frame for the agent: a queued one; a Ping after an interval of quiet; a
        HEARTBEAT_TIMEOUT error once the agent has been silent for three. None: Connect's
        reader ended."""
        try:
            async with asyncio.timeout(self._heartbeat):
                return await session.outbox.get()
        except TimeoutError:
            if session.silent_for() > SILENT_INTERVALS * self._heartbeat:
                return _error("HEARTBEAT_TIMEOUT", "nothing heard from the agent in time")
            ping = agents_pb2.Ping(nonce=uuid.uuid4().hex)
            ping.time.GetCurrentTime()
            return agents_pb2.ConnectResponse(ping=ping)

    async def _end_on_close(self, session: Session) -> None:
        await self._closing.wait()
        session.send(_end("SERVER_SHUTDOWN"))

    # -- agents that speak only HTTP --------------------------------------------------------

    async def RegisterAgent(
        self, request: agents_pb2.RegisterAgentRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.RegisterAgentResponse:
        who = require_principal()
        hello = agents_pb2.Hello(
            name=request.name,
            type=request.type,
            capabilities=request.capabilities,
            max_capacity=request.max_capacity,
            configuration=request.configuration,
            version=request.version,
        )
        problem = hello_problem(hello)
        if problem:
            raise ValidationError(problem[1], details={"field": problem[0]})
        with http.registry_errors():
            known = await self._directory.known(agent_id_of(who.subject, hello.name))
            async with self._attaching:
                session = await self._open(who, hello, over_http=True)
            view = await self._directory.get(who, session.agent_id)
        await set_http_status(context, 200 if known else 201)
        return agents_pb2.RegisterAgentResponse(
            agent=agent_proto(view),
            heartbeat_interval_seconds=self._heartbeat,
            lease_duration_seconds=self._lease,
        )

    async def Heartbeat(
        self, request: agents_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.HeartbeatResponse:
        http.check_heartbeat(request)
        session = await self._agent(require_principal(), request.agent_id)
        try:
            reply = await self._renew(
                session, list(dict.fromkeys(request.task_ids)), _timeout(context)
            )
        except grpc.aio.AioRpcError as exc:
            raise http.tasks_error(exc, "") from None
        return agents_pb2.HeartbeatResponse(
            lease_expires_at=reply.lease_expires_at if reply.renewed_task_ids else None,
            renewed_task_ids=reply.renewed_task_ids,
            lost_task_ids=reply.lost_task_ids,
            heartbeat_interval_seconds=self._heartbeat,
        )

    async def ReportProgress(
        self, request: agents_pb2.ReportProgressRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.ReportProgressResponse:
        http.check_progress(request)
        session = await self._agent(require_principal(), request.agent_id)
        progress = agents_pb2.TaskProgress(
            task_id=request.task_id,
            attempt_token=request.attempt_token,
            progress=request.progress,
            message=request.message,
        )
        try:
            reply = await self._progress(session, progress, _timeout(context))
        except grpc.aio.AioRpcError as exc:
            raise http.tasks_error(exc, request.task_id) from None
        return agents_pb2.ReportProgressResponse(lease_expires_at=reply.lease_expires_at)

    async def CompleteTask(
        self, request: agents_pb2.CompleteTaskRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.CompleteTaskResponse:
        http.check_outcome(request)
        session = await self._agent(require_principal(), request.agent_id)
        result = agents_pb2.TaskResult(task_id=request.task_id, attempt_token=request.attempt_token)
        if request.HasField("error"):
            result.error.CopyFrom(request.error)
        else:
            result.result.CopyFrom(request.result)
        ack, following = await self._result(session, result, _timeout(context))
        if following is not None:
            await self._hand_out(session, following)
        details = {"task_id": request.task_id}
        if ack is None:
            raise Unavailable("the tasks service is unavailable; retry", details=details)
        if ack.reason == "TASK_NOT_FOUND":
            raise NotFound("no such task", reason="TASK_NOT_FOUND", details=details)
        if not ack.accepted:
            raise Conflict("this attempt no longer holds the task", details=details)
        return agents_pb2.CompleteTaskResponse(task_id=ack.task_id, status=ack.status)

    async def StreamAssignments(
        self, request: agents_pb2.StreamAssignmentsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        session = await self._agent(require_principal(), request.agent_id)
        session = await self._attach(session)
        dispatcher = asyncio.create_task(self._dispatch(session))
        closer = asyncio.create_task(self._end_on_close(session))
        ids = itertools.count(1)
        log.info("assignment stream opened", extra={"agent_id": session.agent_id})
        try:
            # Like Connect's Welcome: the effective configuration, then the work the agent
            # holds, with unchanged attempt tokens, so that a reconnect loses nothing.
            opening = [
                agents_pb2.ConnectResponse(
                    config_update=agents_pb2.ConfigUpdate(
                        configuration=struct(session.configuration)
                    )
                )
            ]
            opening += [agents_pb2.ConnectResponse(assignment=a) for a in session.holding()]
            yield sse.body(
                sse.retry(http.SSE_RETRY_MS)
                + "".join(http.sse_event(f, str(next(ids))) for f in opening)
            )
            while True:
                frame = await self._next(session)
                if frame is None:
                    return
                text = http.sse_event(frame, str(next(ids)))
                if text:
                    yield sse.body(text)
                if _last(frame):
                    return
        finally:
            dispatcher.cancel()
            closer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(dispatcher, closer, return_exceptions=True)
            # The session stays: the agent is online while its calls keep coming. Its leases
            # are not released; they run out unless heartbeats renew them.
            session.streaming = False
            log.info("assignment stream closed", extra={"agent_id": session.agent_id})

    async def _agent(self, who: Principal, agent_id: str) -> Session:
        """The caller's agent on this server, marked as heard from. NOT_FOUND unless the
        caller's key registered it. An agent registered before whose session ended (silence,
        a restart) gets a new one: it is online again."""
        session = self._registry.get(agent_id)
        if session is None or session.key_id != who.token_id:
            async with self._attaching:
                session = self._registry.get(agent_id)
                if session is None or session.key_id != who.token_id:
                    session = await self._reattach(who, agent_id)
        session.seen()
        return session

    async def _reattach(self, who: Principal, agent_id: str) -> Session:
        found: list[View] = []
        if 1 <= len(agent_id) <= http.ID_MAX:
            with http.registry_errors():
                found = await self._directory.resolve([agent_id], who.token_id)
        mine = [v for v in found if v.owner_id == who.subject]
        if not mine:
            raise NotFound("no such agent", details={"agent_id": agent_id[: http.ID_MAX]})
        session = http.session_of(mine[0])
        with http.registry_errors():
            await self._take_over(session)
        return session

    async def _attach(self, session: Session) -> Session:
        """The session an SSE stream writes: the agent's HTTP session when no stream has it,
        else a successor that takes its work over (the older stream ends with REPLACED)."""
        async with self._attaching:
            current = self._registry.get(session.agent_id) or session
            if current.http and not current.streaming:
                current.streaming = True
                current.unqueue_assignments()
                return current
            successor = http.successor_of(current)
            successor.streaming = True
            with http.registry_errors():
                await self._take_over(successor)
            return successor

    async def expire_http_agents(self) -> None:
        """Runs for the life of the server: an HTTP agent with no stream open that has been
        silent for three heartbeat intervals goes offline (HEARTBEAT_LOST). Its leases are
        not released: they run out, as a crashed Connect agent's do."""
        while True:
            await asyncio.sleep(self._heartbeat)
            for session in self._registry.all():
                if (
                    session.http
                    and not session.streaming
                    and session.silent_for() > SILENT_INTERVALS * self._heartbeat
                ):
                    self._registry.remove(session)
                    try:
                        await self._directory.disconnect(session, "HEARTBEAT_LOST")
                    except Exception:  # the row stays online until the reaper sees it stale
                        log.exception("could not record a silent http agent offline")
                    log.info("http agent went silent", extra={"agent_id": session.agent_id})

    # -- the registry over REST -------------------------------------------------------------

    async def ListAgents(
        self, request: agents_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.ListAgentsResponse:
        p = page(request.limit, request.offset)
        found = await self._directory.listing(
            require_principal(), request.status, list(request.capabilities)
        )
        return agents_pb2.ListAgentsResponse(
            agents=[agent_proto(v) for v in found.agents[p.offset : p.offset + p.limit]],
            **p.fields(len(found.agents)),
            active=found.online,
            idle=found.idle,
            busy=found.online - found.idle,
        )

    async def GetAgent(
        self, request: agents_pb2.GetAgentRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.Agent:
        return agent_proto(await self._directory.get(require_principal(), request.agent_id))

    async def UpdateAgentConfig(
        self, request: agents_pb2.UpdateAgentConfigRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.UpdateAgentConfigResponse:
        change = await self._directory.configure(
            require_principal(),
            request.agent_id,
            json_format.MessageToDict(request.configuration),
            list(request.update_mask.paths),
        )
        config = struct(change.configuration)
        if change.session is not None:
            change.session.send(
                agents_pb2.ConnectResponse(
                    config_update=agents_pb2.ConfigUpdate(
                        configuration=config, updated_fields=change.updated_fields
                    )
                )
            )
        return agents_pb2.UpdateAgentConfigResponse(
            agent_id=request.agent_id, updated_fields=change.updated_fields, configuration=config
        )


def agent_proto(view: View) -> agents_pb2.Agent:
    online_since = view.connected_at if view.online else None
    uptime = (time.time() - online_since.timestamp()) if online_since else 0
    return agents_pb2.Agent(
        agent_id=view.agent_id,
        name=view.name,
        type=view.type,
        status=view.status,
        capabilities=list(view.capabilities),
        current_load=view.current_load,
        max_capacity=view.max_capacity,
        configuration=struct(view.configuration),
        owner_id=view.owner_id,
        version=view.version,
        health=agents_pb2.AgentHealth(
            status="healthy" if view.online else "unhealthy",
            uptime_seconds=max(0, int(uptime)),
            last_heartbeat=timestamp(view.last_seen_at),
        ),
        connected_at=timestamp(online_since),
    )


class AgentsInternalService(agents_pb2_grpc.AgentsInternalServiceServicer):
    def __init__(self, *, directory: AgentDirectory) -> None:
        self._directory = directory
        self._registry = directory.registry

    async def DeliverCancellation(
        self, request: agents_pb2.DeliverCancellationRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.DeliverCancellationResponse:
        session = self._registry.get(request.agent_id)
        if session is None:
            # Not connected here: its next heartbeat (after a reconnect) learns the lease is
            # gone. Only an agent the registry never saw is NOT_FOUND.
            if not await self._directory.known(request.agent_id):
                raise NotFound("no such agent", details={"agent_id": request.agent_id[:64]})
            return agents_pb2.DeliverCancellationResponse()
        token = request.attempt_token
        # A token names one attempt: a newer attempt of the task that this agent holds now
        # keeps its place.
        session.drop(request.task_id, token)
        session.send(_cancellation(request.task_id, request.reason or "CANCELLED", token))
        session.wake.set()
        return agents_pb2.DeliverCancellationResponse()

    async def NotifyTasksAvailable(
        self, request: agents_pb2.NotifyTasksAvailableRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.NotifyTasksAvailableResponse:
        self._registry.wake(set(request.capabilities))
        return agents_pb2.NotifyTasksAvailableResponse()

    async def ResolveAgents(
        self, request: agents_pb2.ResolveAgentsRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.ResolveAgentsResponse:
        found = await self._directory.resolve(list(request.agent_ids), request.key_id)
        return agents_pb2.ResolveAgentsResponse(
            agents=[
                agents_pb2.AgentIdentity(
                    agent_id=v.agent_id,
                    owner_id=v.owner_id,
                    key_id=v.key_id,
                    name=v.name,
                    online=v.online,
                )
                for v in found
            ]
        )
