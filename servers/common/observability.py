"""What seed 001's observability endpoints show (MetricsService.GetObservabilityMetrics and
ListActiveTraces): the calls of this process, in flight and recent, and counts, since it
started, of its calls, of the database statements and outside calls made for them, and of the
events it published.

Kept whether or not OpenTelemetry exports spans (tracing.py): a dictionary entry and a bounded
deque per call, a counter per statement. The figures are the process's: with `agentmesh up`,
all four services.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

# The codes OpenTelemetry's gRPC conventions count as a server span's error; the others
# (NOT_FOUND, PERMISSION_DENIED, ...) refuse the caller's input, and are not the server's.
SERVER_ERRORS = frozenset(
    {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "DATA_LOSS"}
)
KEEP = 1000  # ended calls kept for ListActiveTraces
IN_FLIGHT = "IN_FLIGHT"
# version-traceid-parentid-flags (W3C Trace Context); an all-zero trace id is invalid.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}\Z")
_WORD = re.compile(r"(?<!^)(?=[A-Z])")


@dataclass(slots=True)
class CallRecord:
    method: str
    started_at: float  # epoch seconds
    started: float  # perf_counter
    trace_id: str
    span_id: str
    request_id: str
    user_id: str = ""
    status: str = IN_FLIGHT
    seconds: float = 0.0
    # While in flight: who is calling, once authenticated ("" before). A stream's caller is
    # known long before it ends.
    caller: Callable[[], str] | None = None

    @property
    def user(self) -> str:
        """The caller's user id: as the call ended, or as it is known while in flight."""
        if self.status == IN_FLIGHT and self.caller is not None:
            return self.caller()
        return self.user_id

    @property
    def operation(self) -> str:
        """The RPC in snake case: "/agentmesh.v1.TasksService/CreateTask" is "create_task"."""
        return _WORD.sub("_", self.method.rsplit("/", 1)[-1]).lower()

    def duration(self, at: float) -> float:
        """Seconds it took, or has taken by ``at`` (perf_counter) while in flight."""
        return self.seconds if self.status != IN_FLIGHT else max(0.0, at - self.started)


def trace_id_of(traceparent: str, request_id: str) -> str:
    """The caller's W3C trace id, or else the request id's 32 hex digits (fresh ones when it
    has not that shape)."""
    found = _TRACEPARENT.match(traceparent.strip().lower()) if traceparent else None
    if found and found.group(1) != "0" * 32:
        return found.group(1)
    digits = request_id.replace("-", "").lower()
    if len(digits) == 32 and all(c in "0123456789abcdef" for c in digits):
        return digits
    return secrets.token_hex(16)


class Observed:
    """The process's record; see the module's docstring."""

    def __init__(self, keep: int = KEEP) -> None:
        self._open: dict[int, CallRecord] = {}
        self._ended: deque[CallRecord] = deque(maxlen=keep)
        self.calls = 0
        self.server_errors = 0
        self.call_seconds = 0.0
        self.statements = 0
        self.external = 0
        self.events: Counter[str] = Counter()

    def begin(
        self,
        method: str,
        request_id: str,
        traceparent: str,
        caller: Callable[[], str] | None = None,
    ) -> CallRecord:
        record = CallRecord(
            method=method,
            started_at=time.time(),
            started=time.perf_counter(),
            trace_id=trace_id_of(traceparent, request_id),
            span_id=secrets.token_hex(8),
            request_id=request_id,
            caller=caller,
        )
        self._open[id(record)] = record
        return record

    def end(self, record: CallRecord, status: str, user_id: str) -> None:
        self._open.pop(id(record), None)
        record.seconds = time.perf_counter() - record.started
        record.status, record.user_id = status, user_id
        record.caller = None  # kept for a while among the ended: not the call with it
        self._ended.append(record)
        self.calls += 1
        self.call_seconds += record.seconds
        self.server_errors += status in SERVER_ERRORS

    def published(self, event_type: str) -> None:
        self.events[event_type.partition(".")[0]] += 1

    def active(self, limit: int) -> list[CallRecord]:
        """Calls in flight, longest running first, then the latest ended, newest first."""
        running = sorted(self._open.values(), key=lambda r: r.started)
        return (running + list(reversed(self._ended)))[:limit]


OBSERVED = Observed()


def count_statement(*_: object) -> None:
    """An SQLAlchemy before_cursor_execute listener: one more database span (PostgreSQL;
    such a listener costs 3 to 6 us a statement, as SQLAlchemy then runs its event path)."""
    OBSERVED.statements += 1


def count_sql(_: str) -> None:
    """A sqlite3 trace callback: one more database span, for a fraction of a microsecond
    (SQLite's own statements, BEGIN and COMMIT among them)."""
    OBSERVED.statements += 1
