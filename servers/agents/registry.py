"""The agents connected to this server, each with its stream's outgoing queue. What outlives a
connection (who the agent is, its configuration overrides, whether it is online) is in the
agents_agents table (domain.py).

A Connect agent's session lives as long as its stream. An HTTP agent's session (``http``) is
its presence on this server: it begins with RegisterAgent (or the first call after the session
was lost), outlives its SSE streams, and ends when the agent has been silent for three heartbeat
intervals with no stream open (service.py). Its outgoing frames wait in the same queue and are
written as Server-Sent Events while a stream is open (``streaming``)."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from agentmesh.v1 import agents_pb2, tasks_pb2

# An agent silent for this many heartbeat intervals is handed no new work (it may be frozen or
# cut off; the writer ends its stream at three).
QUIET_INTERVALS = 1.5
# Frames waiting for a slow agent; past this its stream is cut (``Session.send``): the agent
# reconnects, gets its configuration in the Welcome and the tasks it holds repeated, and its
# leases, renewed by heartbeats, keep its work.
OUTBOX_LIMIT = 1000


@dataclass(eq=False)
class Session:
    agent_id: str
    owner_id: str
    # The API key it connected with.
    key_id: str
    name: str
    type: str
    capabilities: frozenset[str]
    capacity: int
    configuration: dict[str, Any]
    version: str
    # task id -> attempt token of the tasks this agent holds now; "" for a task its heartbeat
    # renewed that this session did not hand out (it was assigned before a reconnection)
    held: dict[str, str] = field(default_factory=dict)
    # The assignments handed out by this session (or the session it took over), to repeat
    # them to a reconnecting SSE stream; only those still in ``held`` count.
    assignments: dict[str, tasks_pb2.Assignment] = field(default_factory=dict)
    # task id -> when this session handed the task out (monotonic): a Connect heartbeat renews
    # a task it does not list only while the assignment may not have reached the agent yet.
    handed_at: dict[str, float] = field(default_factory=dict)
    # The configuration of its Hello or registration, before the stored overrides.
    defaults: dict[str, Any] = field(default_factory=dict)
    # Registered over REST (RegisterAgent): the session outlives its streams.
    http: bool = False
    # An SSE stream writes this session's frames now.
    streaming: bool = False
    outbox: asyncio.Queue[agents_pb2.ConnectResponse | None] = field(
        default_factory=lambda: asyncio.Queue(OUTBOX_LIMIT)
    )
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    last_seen: float = field(default_factory=time.monotonic)
    last_seen_at: float = field(default_factory=time.time)
    connected_at: float = field(default_factory=time.time)
    # Its resource use as its last heartbeat reported it (seed 004's resources); None until one
    # does. Live only: a reader of an agent not connected here sees none.
    resources: agents_pb2.AgentResources | None = None
    # This session (a Connect stream, an HTTP agent's presence), as recorded in the agent's
    # row while it holds the agent.
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    # Whether reaching full capacity writes agent.overloaded; re-armed by the periodic touch
    # once the agent has room again, so a busy agent writes at most one per heartbeat interval.
    overload_armed: bool = True
    # The agent ended its side of the stream itself (it is stopping), rather than the stream
    # breaking: its tasks are released at once instead of waiting for their leases.
    closed_by_agent: bool = False
    # The stream's credential stopped holding (revoked, expired): the stream ended for it.
    credential_refused: bool = False
    # Its dispatcher runs (a stream is open); is asking the tasks service for work now; when
    # it last got some.
    dispatching: bool = False
    claiming: bool = False
    last_claimed: float = 0.0
    # Tasks whose outcome is being recorded with a claim of the next task (work.py's
    # AgentWork.record): each keeps its slot taken until the answer is in, even if a heartbeat
    # drops the task meanwhile, so that the dispatcher cannot fill the slot too.
    refilling: set[str] = field(default_factory=set)
    # Done when the outcome a Connect stream's reader is recording has been (service.py):
    # the stream's end waits for it before it stops the reader.
    recording: asyncio.Future[None] | None = None
    # Ends the stream writing this session's frames (Connect's, or an SSE stream's while one
    # is open; service.py's stream_cutter), and whether it was cut because the agent stopped
    # reading.
    cut: Callable[[], None] | None = None
    overflowed: bool = False

    def seen(self) -> None:
        self.last_seen, self.last_seen_at = time.monotonic(), time.time()

    def status(self) -> str:
        """Seed 004's word: idle (no task), active (working, room left), busy (full)."""
        if not self.held:
            return "idle"
        return "busy" if len(self.held) >= self.capacity else "active"

    def send(self, frame: agents_pb2.ConnectResponse | None) -> bool:
        """Queues a frame; False when the agent does not keep up. Its stream is then cut: the
        writer is stuck on a write the agent does not read, so no frame could say why, and
        whatever the queue dropped (a configuration update, a cancellation) would otherwise
        be lost while the stream went on."""
        try:
            self.outbox.put_nowait(frame)
        except asyncio.QueueFull:
            if not self.overflowed:
                self.overflowed = True
                if self.cut is not None:
                    self.cut()
            return False
        return True

    def free(self) -> int:
        return self.capacity - len(self.refilling.union(self.held))

    def silent_for(self) -> float:
        """Seconds since the agent was last heard from."""
        return time.monotonic() - self.last_seen

    def hold(self, assignment: tasks_pb2.Assignment) -> None:
        task_id = assignment.task.task_id
        self.held[task_id] = assignment.attempt_token
        for gone in [t for t in self.assignments if t not in self.held]:
            del self.assignments[gone]
            self.handed_at.pop(gone, None)
        self.assignments[task_id] = assignment
        self.handed_at[task_id] = time.monotonic()

    def drop(self, task_id: str, attempt_token: str = "") -> None:
        """Stops counting a task as held: any attempt of it when ``attempt_token`` is empty,
        else only that attempt (or one whose token this session never knew)."""
        if not attempt_token or self.held.get(task_id) in ("", attempt_token):
            self.held.pop(task_id, None)
            self.assignments.pop(task_id, None)
            self.handed_at.pop(task_id, None)

    def to_renew(self, listed: Iterable[str], grace: float) -> list[str]:
        """The tasks a Connect heartbeat renews: those it lists, and those this session
        handed out less than ``grace`` seconds ago, which may have reached the agent after it
        wrote the heartbeat. A held task the agent has stopped listing is not renewed: its
        lease runs out and it goes to another attempt, instead of being held, and taking a
        slot, until its time limit."""
        since = time.monotonic() - grace
        recent = (t for t, at in self.handed_at.items() if at > since and t in self.held)
        return sorted({*listed, *recent})

    def holding(self) -> list[tasks_pb2.Assignment]:
        """The assignments handed out that the agent still holds, oldest first."""
        return [a for t, a in self.assignments.items() if self.held.get(t) == a.attempt_token]

    def unsent_assignments(self) -> list[tasks_pb2.Assignment]:
        """Takes the assignment frames still waiting in the queue (a stream ended before
        writing them) out of it; the other frames stay."""
        unsent, kept = [], []
        while not self.outbox.empty():
            frame = self.outbox.get_nowait()
            if frame is not None and frame.HasField("assignment"):
                unsent.append(frame.assignment)
            else:
                kept.append(frame)
        for frame in kept:
            self.outbox.put_nowait(frame)
        return unsent

    def unqueue_assignments(self) -> None:
        """Drops the assignment frames still waiting in the queue (a stream broke before
        writing them): the next stream repeats the held ones first anyway."""
        self.unsent_assignments()

    def adopt(self, old: Session) -> None:
        """Takes over the work of the session this one replaces (the same HTTP agent)."""
        self.held = {**old.held, **self.held}
        self.assignments = {**old.assignments, **self.assignments}
        self.handed_at = {**old.handed_at, **self.handed_at}


class Registry:
    def __init__(self, *, quiet_after: float = math.inf) -> None:
        self._sessions: dict[str, Session] = {}
        # Seconds of silence after which a session is handed no new work.
        self.quiet_after = quiet_after

    def quiet(self, session: Session) -> bool:
        return session.silent_for() > self.quiet_after

    def add(self, session: Session) -> Session | None:
        """Registers a session; returns the one it replaces (the same agent connected again)."""
        old = self._sessions.get(session.agent_id)
        self._sessions[session.agent_id] = session
        return old

    def remove(self, session: Session) -> None:
        if self._sessions.get(session.agent_id) is session:
            del self._sessions[session.agent_id]

    def restore(self, session: Session, replaced: Session | None) -> None:
        """Undoes ``add(session)``, which replaced ``replaced``."""
        self.remove(session)
        if replaced is not None and session.agent_id not in self._sessions:
            self._sessions[session.agent_id] = replaced

    def get(self, agent_id: str) -> Session | None:
        return self._sessions.get(agent_id)

    def wake(self, capabilities: set[str]) -> None:
        """A task needing these capabilities was queued: wakes the dispatcher of one session
        that could take it, the one with most room (longest without work among equals), not
        every such session, whose claims but one would come back empty. When every session
        that could take it is claiming or woken already, all of those look once more: a claim
        that began before the task was committed may have missed it."""
        able = [
            s
            for s in self._sessions.values()
            if s.dispatching
            and s.free() > 0
            and capabilities <= s.capabilities
            and not self.quiet(s)
        ]
        idle = [s for s in able if not s.claiming and not s.wake.is_set()]
        if idle:
            min(idle, key=lambda s: (-s.free(), s.last_claimed)).wake.set()
            return
        for session in able:
            session.wake.set()

    def all(self) -> list[Session]:
        return list(self._sessions.values())
