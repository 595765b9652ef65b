"""AgentsService: the agent worker's side, over Connect (the bidirectional stream that replaces
the seed documents' WebSockets) or, for agents that speak only HTTP, over RegisterAgent,
Heartbeat, ReportProgress, CompleteTask and the StreamAssignments SSE stream; the agent registry
over REST (list, get, configure); and AgentsInternalService.

Every agent that ever connected or registered has a row in agents_agents (domain.py says when it
counts as online, and how an agent whose server died is set offline); reads merge the row with
the live session when the agent is connected here.

Both kinds of agent run on the same pieces (work.py). A Connect stream is its session: the
reader of the agent's frames feeds those. An HTTP agent's session outlives its SSE streams
(registry.py): the unary calls feed the same pieces, and the dispatcher runs while a stream is
open.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc
from google.api import httpbody_pb2
from sqlalchemy.exc import SQLAlchemyError

from agentmesh.v1 import agents_pb2, agents_pb2_grpc, tasks_pb2
from servers.common import sse
from servers.common.auth import Authenticator, current_call_check
from servers.common.clock import timestamp
from servers.common.context import Principal, require_principal, set_http_status
from servers.common.errors import Conflict, NotFound, RateLimited, Unavailable, ValidationError
from servers.common.internal import CALL_TIMEOUT, InternalChannel
from servers.common.jobs import stop_jobs
from servers.common.pagination import page
from servers.common.protos import as_json, struct

from . import http
from .domain import AgentDirectory, View
from .pacing import Pacer
from .registry import OUTBOX_LIMIT, Session
from .signals import Signals
from .work import (
    CANCEL_MESSAGE_MAX,
    POLL_SECONDS,
    SILENT_INTERVALS,
    AgentWork,
    agent_id_of,
    cancellation_frame,
    error_frame,
    hello_problem,
    last_frame,
)

log = logging.getLogger("agentmesh.agents")

HELLO_TIMEOUT = 10.0
# Heartbeat intervals within which a Connect heartbeat renews a task it does not list: one for
# a heartbeat written before the assignment arrived, one more for the way.
UNLISTED_GRACE = 2
# Seconds a cut stream's abort is given to go out before its task is cancelled (_cutter).
CUT_WAIT = 1.0


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
        signals: Signals,
        poll_seconds: float = POLL_SECONDS,
        closing: asyncio.Event | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        self._directory = directory
        # Checks again, every heartbeat interval, the credential an open stream came with.
        self._authenticator = authenticator
        self._registry = directory.registry
        self._signals = signals
        self._heartbeat = heartbeat_seconds
        self._lease = lease_seconds
        # `closing` is set when the server starts to stop: open streams end with StreamEnd
        # SERVER_SHUTDOWN.
        self._work = AgentWork(
            directory=directory,
            tasks=tasks,
            heartbeat_seconds=heartbeat_seconds,
            lease_seconds=lease_seconds,
            closing=closing or asyncio.Event(),
            signals=signals,
            poll_seconds=poll_seconds,
        )
        # New HTTP sessions (registration, a rebuilt session, a new stream) one at a time, so
        # that two calls at once make one session. They are rare: once per start or stream.
        self._attaching = asyncio.Lock()
        # Streams being cut (_cutter), held until done: the loop keeps only weak references.
        self._cuts: set[asyncio.Future[None]] = set()

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
            yield error_frame("VALIDATION_ERROR", "the first frame must be a Hello")
            return
        problem = (
            hello_problem(first.hello) if first.HasField("hello") else ("", "first frame: Hello")
        )
        if problem:
            yield error_frame("VALIDATION_ERROR", problem[1])
            return
        try:
            session = await self._work.open_session(who, first.hello)
        except RateLimited as exc:  # the owner has as many agents as allowed
            yield error_frame(exc.reason, exc.message)
            return
        except SQLAlchemyError as exc:
            log.warning("could not record an agent's connection: %s", exc)
            yield error_frame("SERVICE_UNAVAILABLE", "the agent registry is unavailable; reconnect")
            return
        reason = "DISCONNECTED"
        session.cut = self._cutter(context)
        # After the Welcome, the work it holds from before (a reconnection) comes first.
        await self._work.repeat_held(session)
        reader = asyncio.create_task(self._read(session, frames))
        dispatcher = asyncio.create_task(self._work.dispatch(session))
        closer = asyncio.create_task(self._work.end_on_close(session))
        guard = self._guard(session)
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
                frame = await self._work.next_frame(session)
                if frame is None:  # the reader ended: the agent closed its side, or it broke
                    if session.closed_by_agent:
                        reason = "AGENT_STOPPED"
                        await self._work.release(session)
                    return
                yield frame
                if last_frame(frame):
                    reason = frame.error.code if frame.HasField("error") else frame.end.reason
                    return
        finally:
            if session.overflowed:
                reason = "NOT_READING"
            # An outcome the reader is recording is let finish (it may lease the next task);
            # cancelled, it would be lost, and with it the task leased with it.
            if session.recording is not None and not session.recording.done():
                await asyncio.wait({session.recording}, timeout=CALL_TIMEOUT)
            with contextlib.suppress(asyncio.CancelledError):
                await stop_jobs((reader, dispatcher, closer, guard), patience=CALL_TIMEOUT)
            self._registry.remove(session)
            if session.credential_refused:
                # Its tasks go to other agents now, not when their leases run out.
                await self._work.release(session)
            # What this stream never wrote goes back to the queue at once.
            await self._work.give_back(session, session.unsent_assignments())
            await self._directory.disconnect(session, reason)
            log.info("agent disconnected", extra={"agent_id": session.agent_id})

    def _cutter(self, context: grpc.aio.ServicerContext) -> Callable[[], None]:
        """Ends the calling stream from outside it, for a session whose agent stopped reading
        (Session.send). Its writer is stuck on a write the agent does not read, so the stream
        cannot end the usual way: the call is aborted (RESOURCE_EXHAUSTED, which the agent
        reads after the frames already on their way, and reconnects), then its task is
        cancelled, so that the stream's cleanup runs now. Cancelled alone, the task would
        leave the agent's side of the call open for ever."""
        writer = asyncio.current_task()

        async def cut() -> None:
            with contextlib.suppress(grpc.aio.AbortError, TimeoutError):
                # The abort's status waits behind the unread frames: it is sent, not awaited.
                await asyncio.wait_for(
                    context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the agent did not read its stream ({OUTBOX_LIMIT} frames waited);"
                        " reconnect",
                    ),
                    CUT_WAIT,
                )
            if writer is not None:
                writer.cancel()

        def start() -> None:
            job = asyncio.ensure_future(cut())
            self._cuts.add(job)
            job.add_done_callback(self._cuts.discard)

        return start

    def _guard(self, session: Session) -> asyncio.Task[None]:
        """The stream's credential check (AgentWork.guard_credential): the call's own
        authorization, run again every heartbeat interval."""
        check = current_call_check(self._authenticator)
        return asyncio.create_task(self._work.guard_credential(session, check))

    async def _read(
        self, session: Session, frames: AsyncIterator[agents_pb2.ConnectRequest]
    ) -> None:
        pacer = Pacer(capacity=session.capacity, heartbeat_seconds=self._heartbeat)
        try:
            async for frame in frames:
                session.seen()
                kind = frame.WhichOneof("kind")
                if kind == "heartbeat":
                    try:
                        http.check_heartbeat(frame.heartbeat)
                    except ValidationError as exc:
                        session.send(error_frame("VALIDATION_ERROR", exc.message))
                        return
                    if frame.heartbeat.HasField("resources"):
                        session.resources = frame.heartbeat.resources
                    for waiting in pacer.due():
                        await self._progress(session, waiting)
                    if pacer.may_renew():
                        # Also the tasks handed out too recently to be listed yet.
                        await self._renew_streamed(
                            session,
                            session.to_renew(
                                frame.heartbeat.task_ids, UNLISTED_GRACE * self._heartbeat
                            ),
                        )
                elif kind == "progress":
                    progress = frame.progress
                    if not progress.task_id or not progress.attempt_token:
                        # It names no attempt: the tasks service would refuse it, and a
                        # Cancellation without a token would stop whatever the agent runs.
                        continue
                    for due in pacer.progress(progress):
                        await self._progress(session, due)
                elif kind == "result":
                    pacer.ended(frame.result.task_id)
                    # Marked, so that the stream's end lets it finish before stopping the
                    # reader (no task of its own: that would cost a loop turn per outcome).
                    recording = session.recording = asyncio.get_running_loop().create_future()
                    try:
                        await self._on_result(session, frame.result)
                    finally:
                        recording.set_result(None)
                elif kind == "hello":
                    session.send(error_frame("VALIDATION_ERROR", "Hello may only come first"))
                    return
            session.closed_by_agent = True
        except grpc.aio.AioRpcError:
            pass  # the agent's side broke; the writer ends the stream
        except ValidationError as exc:  # a frame that could not be decoded
            session.send(error_frame("VALIDATION_ERROR", exc.message))
        finally:
            session.send(None)

    async def _progress(self, session: Session, progress: agents_pb2.TaskProgress) -> None:
        try:
            await self._work.report_progress(session, progress)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND):
                # That attempt only: a newer one of the same task may run here.
                session.send(
                    cancellation_frame(
                        progress.task_id[:64], "LEASE_LOST", progress.attempt_token[:64]
                    )
                )

    async def _on_result(self, session: Session, result: agents_pb2.TaskResult) -> None:
        try:
            http.check_outcome(http.outcome_request(session.agent_id, result))
        except ValidationError as exc:
            # Refused, not a broken stream: a reconnecting agent would send it again.
            log.warning(
                "refused a malformed result: %s",
                exc.message,
                extra={"agent_id": session.agent_id, "task_id": result.task_id[:64]},
            )
            refused = agents_pb2.TaskResultAck(
                task_id=result.task_id[:64],
                attempt_token=result.attempt_token[:64],
                accepted=False,
                reason="VALIDATION_ERROR",
            )
            session.send(agents_pb2.ConnectResponse(result_ack=refused))
            return
        ack, following = await self._work.record(session, result)
        if ack is not None:
            session.send(agents_pb2.ConnectResponse(result_ack=ack))
        if following is not None:
            await self._work.hand_out(session, following)

    async def _renew_streamed(self, session: Session, task_ids: list[str]) -> None:
        try:
            reply = await self._work.renew(session, task_ids)
        except grpc.aio.AioRpcError as exc:
            log.warning("lease renewal failed: %s", exc.code().name)
            return
        for task_id in reply.lost_task_ids:
            session.send(cancellation_frame(task_id, "LEASE_LOST"))

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
                session = await self._work.open_session(who, hello, over_http=True)
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
        if request.HasField("resources"):
            session.resources = request.resources
        try:
            reply = await self._work.renew(
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
            reply = await self._work.report_progress(session, progress, _timeout(context))
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
        ack, following = await self._work.record(session, result, _timeout(context))
        if following is not None:
            await self._work.hand_out(session, following)
        details = {"task_id": request.task_id}
        if ack is None:
            raise Unavailable("the tasks service is unavailable; retry", details=details)
        if ack.reason == "TASK_NOT_FOUND":
            raise NotFound("no such task", reason="TASK_NOT_FOUND", details=details)
        if ack.reason == "VALIDATION_ERROR":
            raise ValidationError("the tasks service refused this outcome", details=details)
        if not ack.accepted:
            # errors.md: a CONFLICT says the state that forbids it.
            status = {"status": ack.status} if ack.status else {}
            raise Conflict("this attempt no longer holds the task", details=details | status)
        return agents_pb2.CompleteTaskResponse(task_id=ack.task_id, status=ack.status)

    async def StreamAssignments(
        self, request: agents_pb2.StreamAssignmentsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        session = await self._agent(require_principal(), request.agent_id)
        session = await self._attach(session)
        dispatcher = asyncio.create_task(self._work.dispatch(session))
        closer = asyncio.create_task(self._work.end_on_close(session))
        guard = self._guard(session)
        ids = itertools.count(1)
        log.info("assignment stream opened", extra={"agent_id": session.agent_id})
        # An HTTP session's queue outlives its streams: a new stream may be cut again.
        session.cut, session.overflowed = self._cutter(context), False
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
                frame = await self._work.next_frame(session)
                if frame is None:
                    return
                text = http.sse_event(frame, str(next(ids)))
                if text:
                    yield sse.body(text)
                if last_frame(frame):
                    return
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await stop_jobs((dispatcher, closer, guard), patience=CALL_TIMEOUT)
            # The session stays: the agent is online while its calls keep coming. Its leases
            # are not released; they run out unless heartbeats renew them (its REST calls
            # check its key each time, so a revoked key renews nothing).
            session.streaming = False
            session.cut = None
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
            await self._work.take_over(session)
        # Its session lapsed (silence, a restart of the mesh) while it held tasks: they count
        # against its capacity, and its next stream repeats them first, as Connect's does.
        await self._work.learn_held(session)
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
                await self._work.take_over(successor)
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
            require_principal(), request.status, list(request.capabilities), p
        )
        read = p.read(len(found.agents), found.total)  # a page of large configurations ends early
        figures = await self._work.figures([v.agent_id for v in found.agents])
        agents, served = read.fit([agent_proto(v, figures.get(v.agent_id)) for v in found.agents])
        return agents_pb2.ListAgentsResponse(
            agents=agents,
            **served.fields(found.total),
            active=found.online,
            idle=found.idle,
            busy=found.online - found.idle,
        )

    async def GetAgent(
        self, request: agents_pb2.GetAgentRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.Agent:
        view = await self._directory.get(require_principal(), request.agent_id)
        figures = await self._work.figures([view.agent_id])
        return agent_proto(view, figures.get(view.agent_id))

    async def UpdateAgentConfig(
        self, request: agents_pb2.UpdateAgentConfigRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.UpdateAgentConfigResponse:
        change = await self._directory.configure(
            require_principal(),
            request.agent_id,
            as_json(request.configuration, "configuration"),
            list(request.update_mask.paths),
        )
        # To the agent's stream, here or on another replica.
        await self._signals.configured(
            request.agent_id, change.session, change.configuration, change.updated_fields
        )
        return agents_pb2.UpdateAgentConfigResponse(
            agent_id=request.agent_id,
            updated_fields=change.updated_fields,
            configuration=struct(change.configuration),
        )


def agent_metrics(figures: tasks_pb2.AgentFigures | None) -> agents_pb2.AgentMetrics:
    """Seed 004's metrics from what the agent finished (zeros for an agent with nothing)."""
    if figures is None:
        return agents_pb2.AgentMetrics()
    finished = figures.completed + figures.failed
    return agents_pb2.AgentMetrics(
        tasks_completed=figures.completed,
        average_duration=round(figures.average_duration, 3),
        success_rate=round(figures.completed / finished, 4) if finished else 0.0,
        error_rate=round(figures.failed / finished, 4) if finished else 0.0,
    )


def agent_proto(view: View, figures: tasks_pb2.AgentFigures | None = None) -> agents_pb2.Agent:
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
        metrics=agent_metrics(figures),
        resources=view.resources,
    )


class AgentsInternalService(agents_pb2_grpc.AgentsInternalServiceServicer):
    def __init__(self, *, directory: AgentDirectory, signals: Signals) -> None:
        self._directory = directory
        self._registry = directory.registry
        self._signals = signals

    async def DeliverCancellation(
        self, request: agents_pb2.DeliverCancellationRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.DeliverCancellationResponse:
        # Only an agent the registry never saw is NOT_FOUND. One not connected anywhere learns
        # that its lease is gone from its next heartbeat, after it reconnects.
        if self._registry.get(request.agent_id) is None and not await self._directory.known(
            request.agent_id
        ):
            raise NotFound("no such agent", details={"agent_id": request.agent_id[:64]})
        await self._signals.cancel(
            request.agent_id,
            request.task_id,
            request.reason,
            request.attempt_token,
            request.message[:CANCEL_MESSAGE_MAX],
        )
        return agents_pb2.DeliverCancellationResponse()

    async def NotifyTasksAvailable(
        self, request: agents_pb2.NotifyTasksAvailableRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.NotifyTasksAvailableResponse:
        self._signals.tasks_available(frozenset(request.capabilities))
        return agents_pb2.NotifyTasksAvailableResponse()

    async def CountAgents(
        self, request: agents_pb2.CountAgentsRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.CountAgentsResponse:
        registered, online = await self._directory.counts()
        return agents_pb2.CountAgentsResponse(registered=registered, online=online)

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
