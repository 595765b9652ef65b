"""What an agent that speaks only HTTP needs beyond Connect: the limits of its REST requests, a
session rebuilt from the registry, its frames written as Server-Sent Events, and the mapping of
the tasks service's refusals to REST errors. The calls themselves are AgentsService's
(service.py), which runs both kinds of agent with the same dispatcher and lease handling.

How the REST calls map to Connect's frames:

    RegisterAgent        Hello (same rules, same agent id, same registry row)
    StreamAssignments    the server side of the stream: assignments, cancellations,
                         configuration updates, pings, a last error or end frame
    Heartbeat            a heartbeat frame, but it renews exactly the tasks it lists
    ReportProgress       a progress frame; a stale attempt is 409 instead of a Cancellation
    CompleteTask         a result frame; the TaskResultAck becomes the answer (409 if refused)
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator

import grpc
from sqlalchemy.exc import SQLAlchemyError

from agentmesh.v1 import agents_pb2, common_pb2
from servers.common import sse
from servers.common.errors import (
    AgentmeshError,
    Conflict,
    NotFound,
    Unavailable,
    ValidationError,
)
from servers.common.internal import error_details
from servers.common.protos import as_json

from .domain import View
from .registry import Session

# How long an EventSource waits before it reconnects.
SSE_RETRY_MS = 1000
ID_MAX = 64
# As many task ids as the largest agent can hold.
TASK_IDS_MAX = 1000
LOAD_MAX = 1000
# The tasks service keeps this much of a progress message (task.progress) and of an error.
PROGRESS_MESSAGE_MAX = 500
ERROR_MESSAGE_MAX = 2000
ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}\Z")
DETAILS_MAX_BYTES = 64 * 1024


def _invalid(field: str, message: str) -> ValidationError:
    return ValidationError(message, details={"field": field})


def _check_id(field: str, value: str) -> None:
    if not 1 <= len(value) <= ID_MAX:
        raise _invalid(field, f"{field} is required (at most {ID_MAX} characters)")


def check_heartbeat(request: agents_pb2.HeartbeatRequest | agents_pb2.AgentHeartbeat) -> None:
    """An HTTP agent's heartbeat, or a Connect one: the same limits."""
    if not 0 <= request.current_load <= LOAD_MAX:
        raise _invalid("current_load", f"current_load must be 0 to {LOAD_MAX}")
    r = request.resources
    for name, value in (
        ("cpu_usage", r.cpu_usage),
        ("memory_usage", r.memory_usage),
        ("memory_limit", r.memory_limit),
    ):
        if not math.isfinite(value) or value < 0:
            raise _invalid(f"resources.{name}", f"resources.{name} must be a number >= 0")
    if len(request.task_ids) > TASK_IDS_MAX:
        raise _invalid("task_ids", f"at most {TASK_IDS_MAX} task_ids")
    for task_id in request.task_ids:
        _check_id("task_ids", task_id)


def check_progress(request: agents_pb2.ReportProgressRequest) -> None:
    _check_id("task_id", request.task_id)
    _check_id("attempt_token", request.attempt_token)
    if not 0 <= request.progress <= 100:
        raise _invalid("progress", "progress must be 0 to 100")
    if len(request.message) > PROGRESS_MESSAGE_MAX:
        raise _invalid("message", f"message: at most {PROGRESS_MESSAGE_MAX} characters")


def outcome_request(agent_id: str, result: agents_pb2.TaskResult) -> agents_pb2.CompleteTaskRequest:
    """A Connect result as the REST request that carries the same outcome, for its checks."""
    request = agents_pb2.CompleteTaskRequest(
        agent_id=agent_id, task_id=result.task_id, attempt_token=result.attempt_token
    )
    if result.HasField("error"):
        request.error.CopyFrom(result.error)
    elif result.HasField("result"):
        request.result.CopyFrom(result.result)
    return request


def check_outcome(request: agents_pb2.CompleteTaskRequest) -> None:
    """The attempt and exactly one outcome, over REST and on Connect alike. A result is
    bounded through Envoy by the 1 MiB body limit; past RESULT_MAX_BYTES the tasks service
    fails the task, as on Connect."""
    _check_id("task_id", request.task_id)
    _check_id("attempt_token", request.attempt_token)
    outcome = request.WhichOneof("outcome")
    if outcome is None:
        raise _invalid("result", "give either result or error")
    if outcome == "result":
        as_json(request.result, "result")
    if outcome == "error":
        error = request.error
        if not ERROR_CODE.match(error.code):
            raise _invalid("error.code", "error.code: an UPPER_SNAKE code, at most 64 characters")
        if not 1 <= len(error.message) <= ERROR_MESSAGE_MAX:
            raise _invalid("error.message", f"error.message: 1 to {ERROR_MESSAGE_MAX} characters")
        details = json.dumps(as_json(error.details, "error.details")).encode()
        if len(details) > DETAILS_MAX_BYTES:
            raise _invalid("error.details", "error.details is larger than 64 KiB")


def session_of(view: View) -> Session:
    """A new HTTP session for an agent known to the registry. Its row's effective
    configuration stands in for the registration's defaults: overlaid with the same overrides
    it stays the same, so the agent sees no difference."""
    return Session(
        agent_id=view.agent_id,
        owner_id=view.owner_id,
        key_id=view.key_id,
        name=view.name,
        type=view.type,
        capabilities=frozenset(view.capabilities),
        capacity=view.max_capacity,
        configuration=dict(view.configuration),
        version=view.version,
        defaults=dict(view.configuration),
        http=True,
    )


def successor_of(session: Session) -> Session:
    """A new HTTP session for the same agent, to replace one that a stream holds."""
    return Session(
        agent_id=session.agent_id,
        owner_id=session.owner_id,
        key_id=session.key_id,
        name=session.name,
        type=session.type,
        capabilities=session.capabilities,
        capacity=session.capacity,
        configuration=dict(session.configuration),
        version=session.version,
        defaults=dict(session.defaults),
        http=True,
    )


def sse_event(frame: agents_pb2.ConnectResponse, event_id: str) -> str:
    """A Connect frame as an SSE frame; "" for the kinds an SSE stream does not carry
    (Welcome, TaskResultAck: their REST counterparts are the answers of the unary calls)."""
    kind = frame.WhichOneof("kind")
    if kind == "assignment":
        return sse.frame("assignment", frame.assignment, event_id=event_id)
    if kind == "cancellation":
        return sse.frame("cancellation", frame.cancellation, event_id=event_id)
    if kind == "config_update":
        return sse.frame("config_update", frame.config_update, event_id=event_id)
    if kind == "ping":
        return sse.frame("ping", common_pb2.Heartbeat(time=frame.ping.time), event_id=event_id)
    if kind == "error":
        return sse.frame("error", frame.error, event_id=event_id)
    if kind == "end":
        return sse.frame("end", frame.end, event_id=event_id)
    return ""


def tasks_error(exc: grpc.aio.AioRpcError, task_id: str) -> AgentmeshError:
    """The tasks service's refusal of a forwarded report, as this service's REST error."""
    details = {"task_id": task_id[:ID_MAX]} if task_id else {}
    code = exc.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound("no such task", reason="TASK_NOT_FOUND", details=details)
    if code == grpc.StatusCode.ABORTED:
        # errors.md: a CONFLICT says the state that forbids it, as the tasks service read it.
        if status := error_details(exc).get("status", "")[:32]:
            details["status"] = status
        return Conflict("this attempt no longer holds the task", details=details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValidationError(exc.details() or "invalid request", details=details)
    return Unavailable("the tasks service is unavailable; retry", details=details)


@contextlib.contextmanager
def registry_errors() -> Iterator[None]:
    """The registry's database failing is 503 SERVICE_UNAVAILABLE (retry), not a 500."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise Unavailable("the agent registry is unavailable; retry") from exc
