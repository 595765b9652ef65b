"""What both kinds of agent run on: a Connect stream's agent and an HTTP agent.

Each has a Session in the registry (registry.py); a dispatcher that claims tasks while the agent
has free capacity (and is heard from) and sleeps until woken (NotifyTasksAvailable) or a short
poll; a writer's next frame, which pings the agent when it is quiet; and one way each of
renewing leases and forwarding progress and outcomes to the tasks service. A lease whose
assignment cannot reach the agent any more is handed back rather than left to run out.
service.py feeds these from a Connect stream or from the HTTP agents' unary calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import TYPE_CHECKING

import grpc
from sqlalchemy.exc import SQLAlchemyError

from agentmesh.v1 import agents_pb2, common_pb2, tasks_pb2, tasks_pb2_grpc
from servers.common.auth import CredentialCheck, guard_stream
from servers.common.context import Principal
from servers.common.errors import AuthRequired, PermissionDenied, ValidationError
from servers.common.internal import CALL_TIMEOUT, InternalChannel, error_details
from servers.common.protos import as_json
from servers.common.text import invisible

from .domain import CAPABILITIES_MAX, AgentDirectory, capabilities_problem, config_problem
from .registry import Session

if TYPE_CHECKING:
    from .signals import Signals

log = logging.getLogger("agentmesh.agents")

# How long an idle dispatcher waits for a wake-up before it asks for work anyway (the
# default of AGENTMESH_CLAIM_POLL_SECONDS): it covers a wake-up that was lost.
POLL_SECONDS = 2
MAX_CAPACITY = 1000
AGENT_IDS = uuid.UUID("6f1d3c2e-8a4b-4c55-9d0e-2b7f4a1c9e10")
# The agent is silent (no frame, no REST call) for this many heartbeat intervals: no new work
# for it; for three, its stream ends (HEARTBEAT_TIMEOUT) and an HTTP agent's session expires.
SILENT_INTERVALS = 3


def agent_id_of(owner_id: str, name: str) -> str:
    """Stable per owner and name, so an agent keeps its id across reconnections."""
    return str(uuid.uuid5(AGENT_IDS, f"{owner_id}/{name}"))


def error_frame(code: str, message: str) -> agents_pb2.ConnectResponse:
    return agents_pb2.ConnectResponse(error=common_pb2.StreamError(code=code, message=message))


def end_frame(reason: str) -> agents_pb2.ConnectResponse:
    return agents_pb2.ConnectResponse(end=common_pb2.StreamEnd(reason=reason))


def last_frame(frame: agents_pb2.ConnectResponse) -> bool:
    return frame.HasField("error") or frame.HasField("end")


# The most of a stopper's words a Cancellation carries (tasks' STOP_REASON_MAX): the agents
# service takes them from the tasks service and from other replicas, and passes on no more.
CANCEL_MESSAGE_MAX = 500


def cancellation_frame(
    task_id: str, reason: str, attempt_token: str = "", message: str = ""
) -> agents_pb2.ConnectResponse:
    return agents_pb2.ConnectResponse(
        cancellation=agents_pb2.Cancellation(
            task_id=task_id,
            reason=reason,
            attempt_token=attempt_token,
            message=message[:CANCEL_MESSAGE_MAX],
        )
    )


def hello_problem(hello: agents_pb2.Hello) -> tuple[str, str] | None:
    """What is wrong with a Hello (or a registration): (field, message), or None."""
    if not 1 <= len(hello.name) <= 64:
        return "name", "name must be 1-64 characters"
    if not hello.name.strip():
        return "name", "name must not be blank"
    if not hello.capabilities:
        return "capabilities", f"capabilities: 1 to {CAPABILITIES_MAX}"
    if problem := capabilities_problem(hello.capabilities):
        return "capabilities", problem
    if not 0 <= hello.max_capacity <= MAX_CAPACITY:
        return "max_capacity", f"max_capacity must be 1 to {MAX_CAPACITY}"
    if len(hello.type) > 64 or len(hello.version) > 64:
        return "type", "type and version: at most 64 characters each"
    for field in ("name", "type", "version"):
        if invisible(getattr(hello, field)):
            return field, (
                f"{field} must not hold control, format, private-use or unassigned characters"
            )
    try:
        configuration = as_json(hello.configuration, "configuration")
    except ValidationError as exc:
        return "configuration", exc.message
    if problem := config_problem(configuration):
        return "configuration", problem
    return None


class AgentWork:
    """The pieces above, on the agents directory and the tasks service's internal API."""

    def __init__(
        self,
        *,
        directory: AgentDirectory,
        tasks: InternalChannel,
        heartbeat_seconds: int,
        lease_seconds: int,
        closing: asyncio.Event,
        signals: Signals,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._directory = directory
        self._registry = directory.registry
        self._channel = tasks
        self._heartbeat = heartbeat_seconds
        self._lease = lease_seconds
        self._closing = closing
        self._signals = signals
        self._poll = poll_seconds

    @property
    def tasks(self) -> tasks_pb2_grpc.TasksInternalServiceStub:
        return self._channel.stub(tasks_pb2_grpc.TasksInternalServiceStub)

    async def release(self, session: Session) -> None:
        try:
            await self.tasks.ReleaseAgentTasks(
                tasks_pb2.ReleaseAgentTasksRequest(
                    agent_id=session.agent_id, reason="AGENT_STOPPED"
                ),
                **self._channel.call_options(),
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("could not release a stopped agent's tasks: %s", exc.code().name)

    async def open_session(
        self, who: Principal, hello: agents_pb2.Hello, *, over_http: bool = False
    ) -> Session:
        """A Hello or a registration: the agent's session, recorded online."""
        configuration = as_json(hello.configuration, "configuration")
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
        await self.take_over(session)
        log.info("agent connected", extra={"agent_id": session.agent_id, "agent_name": hello.name})
        return session

    async def take_over(self, session: Session) -> None:
        """Records the session online with its effective configuration and puts it in the
        registry. The session it replaces here ends with REPLACED; an HTTP session takes over
        the work of the one it replaces, to repeat it to its stream. A Connect session of it on
        another replica ends too (signals.py)."""
        replaced = await self._directory.connect(session, session.defaults)
        if replaced is not None:
            if session.http:
                session.adopt(replaced)
            replaced.send(end_frame("REPLACED"))
        await self._signals.connected(session)

    async def figures(self, agent_ids: list[str]) -> dict[str, tasks_pb2.AgentFigures]:
        """What each agent finished, for its metrics; none when the tasks service does not
        answer (the agents are still listed, with zero metrics, and a warning is logged)."""
        if not agent_ids:
            return {}
        try:
            reply = await self.tasks.GetAgentFigures(
                tasks_pb2.GetAgentFiguresRequest(agent_ids=agent_ids),
                **self._channel.call_options(),
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("could not read the agents' metrics: %s", exc.code().name)
            return {}
        return {f.agent_id: f for f in reply.figures}

    async def repeat_held(self, session: Session) -> None:
        """Queues, for a new stream of the agent, the assignments it still holds (from before
        a reconnection), with their unchanged attempt tokens, and counts them against its
        capacity before anything new is claimed. Without the tasks service they are learnt
        from the agent's first heartbeat instead, as before."""
        for assignment in await self.learn_held(session):
            session.send(agents_pb2.ConnectResponse(assignment=assignment))

    async def learn_held(self, session: Session) -> list[tasks_pb2.Assignment]:
        """Counts as the session's the tasks its agent holds from before (a reconnection, a
        restart of the mesh), with their attempt tokens; the ones it did not know yet."""
        try:
            reply = await self.tasks.ListHeldTasks(
                tasks_pb2.ListHeldTasksRequest(agent_id=session.agent_id),
                **self._channel.call_options(),
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("could not read the tasks a reconnecting agent holds: %s", exc.code().name)
            return []
        learnt = []
        for assignment in reply.assignments:
            if session.held.get(assignment.task.task_id) == assignment.attempt_token:
                continue  # already repeated (an HTTP session took the old one's work over)
            session.hold(assignment)
            learnt.append(assignment)
        return learnt

    async def renew(
        self, session: Session, task_ids: list[str], timeout: float = CALL_TIMEOUT
    ) -> tasks_pb2.RenewLeasesResponse:
        """Renews the leases of these tasks. Renewed ones count as held (also those assigned
        before a reconnection, whose token this session never knew); lost ones no longer."""
        if not task_ids:
            return tasks_pb2.RenewLeasesResponse()
        reply = await self.tasks.RenewLeases(
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

    async def report_progress(
        self, session: Session, progress: agents_pb2.TaskProgress, timeout: float = CALL_TIMEOUT
    ) -> tasks_pb2.TasksInternalServiceReportProgressResponse:
        """Forwards progress (which renews the lease). When the attempt is no longer current
        the task stops counting as held, and the tasks service's error is raised."""
        try:
            return await self.tasks.ReportProgress(
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

    async def record(
        self, session: Session, result: agents_pb2.TaskResult, timeout: float = CALL_TIMEOUT
    ) -> tuple[agents_pb2.TaskResultAck | None, tasks_pb2.Assignment | None]:
        """Forwards an outcome. Returns the ack, accepted or refused, or None when it was
        neither recorded nor refused (the tasks service is away), so the agent sends it again;
        and the agent's next assignment, leased with the outcome, for ``hand_out``."""
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
            reply = await self.tasks.CompleteTask(request, **self._channel.call_options(timeout))
            ack.accepted, ack.status = True, reply.task.status
            if reply.HasField("next"):
                following = reply.next
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                ack.reason = "TASK_NOT_FOUND"
            elif exc.code() == grpc.StatusCode.ABORTED:
                ack.reason = "CONFLICT"
                # The state that refused it (the tasks service's details), as the ack says.
                ack.status = error_details(exc).get("status", "")[:32]
            elif exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                ack.reason = "VALIDATION_ERROR"  # the same outcome would be refused again
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

    async def dispatch(self, session: Session) -> None:
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
                    reply = await self.tasks.ClaimTask(
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
                if not await self.hand_out(session, reply.assignment):
                    return  # replaced, ended, or not reading: the task went back
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll):
                    await session.wake.wait()

    def _may_claim(self, session: Session) -> bool:
        """Whether work may be claimed for the session: a frozen or cut-off agent still has
        one until the writer notices, and must not be handed the work whose lease it just
        lost; nor may a replaced session."""
        return not self._registry.quiet(session) and self._registry.get(session.agent_id) is session

    async def hand_out(self, session: Session, assignment: tasks_pb2.Assignment) -> bool:
        """Gives the agent a task leased to it. False when the session can take no more: it
        ended or was replaced while the task was being leased, or the agent does not keep up
        with its stream; the task is then handed back."""
        session.last_claimed = time.monotonic()
        if self._registry.get(session.agent_id) is not session:
            await self.give_back(session, [assignment])
            return False
        session.hold(assignment)
        if not session.send(agents_pb2.ConnectResponse(assignment=assignment)):
            await self.give_back(session, [assignment])
            return False
        if session.free() == 0 and session.overload_armed:
            try:
                await self._directory.overloaded(session)
            except SQLAlchemyError as exc:
                log.warning("could not record agent.overloaded: %s", exc)
        return True

    async def give_back(self, session: Session, assignments: list[tasks_pb2.Assignment]) -> None:
        """Hands back leases whose assignments never reached the agent: their tasks are queued
        again at once, the attempts not counted, instead of waiting out their leases."""
        for assignment in assignments:
            task_id, token = assignment.task.task_id, assignment.attempt_token
            session.drop(task_id, token)
            try:
                await self.tasks.ReturnTask(
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

    async def next_frame(self, session: Session) -> agents_pb2.ConnectResponse | None:
        """The next frame for the agent: a queued one; a Ping after an interval of quiet; a
        HEARTBEAT_TIMEOUT error once the agent has been silent for three. None: Connect's
        reader ended."""
        try:
            async with asyncio.timeout(self._heartbeat):
                return await session.outbox.get()
        except TimeoutError:
            if session.silent_for() > SILENT_INTERVALS * self._heartbeat:
                return error_frame("HEARTBEAT_TIMEOUT", "nothing heard from the agent in time")
            ping = agents_pb2.Ping(nonce=uuid.uuid4().hex)
            ping.time.GetCurrentTime()
            return agents_pb2.ConnectResponse(ping=ping)

    async def guard_credential(self, session: Session, check: CredentialCheck | None) -> None:
        """Runs for the life of a stream (guard_stream, every heartbeat interval): a credential
        that no longer holds ends the stream with the refusal, and the stream's end then hands
        its tasks back."""

        def refused(exc: AuthRequired | PermissionDenied) -> None:
            log.info(
                "ending a stream whose credential no longer holds: %s",
                exc.message,
                extra={"agent_id": session.agent_id},
            )
            session.credential_refused = True
            session.send(error_frame(exc.reason, exc.message))

        await guard_stream(check, self._heartbeat, refused)

    async def end_on_close(self, session: Session) -> None:
        await self._closing.wait()
        session.send(end_frame("SERVER_SHUTDOWN"))
