"""The agents connected to this server, each with its stream's outgoing queue."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from agentmesh.v1 import agents_pb2

# Frames waiting for a slow agent; past this the stream ends (the agent reconnects and its
# leases, renewed by heartbeats, keep its work).
OUTBOX_LIMIT = 1000


@dataclass(eq=False)
class Session:
    agent_id: str
    owner_id: str
    name: str
    type: str
    capabilities: frozenset[str]
    capacity: int
    configuration: dict[str, Any]
    version: str
    # task id -> attempt token of the tasks this agent holds now
    held: dict[str, str] = field(default_factory=dict)
    outbox: asyncio.Queue[agents_pb2.ConnectResponse | None] = field(
        default_factory=lambda: asyncio.Queue(OUTBOX_LIMIT)
    )
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    last_seen: float = field(default_factory=time.monotonic)
    last_seen_at: float = field(default_factory=time.time)
    connected_at: float = field(default_factory=time.time)
    # The agent ended its side of the stream itself (it is stopping), rather than the stream
    # breaking: its tasks are released at once instead of waiting for their leases.
    closed_by_agent: bool = False

    def seen(self) -> None:
        self.last_seen, self.last_seen_at = time.monotonic(), time.time()

    def status(self) -> str:
        """Seed 004's word: idle (no task), active (working, room left), busy (full)."""
        if not self.held:
            return "idle"
        return "busy" if len(self.held) >= self.capacity else "active"

    def send(self, frame: agents_pb2.ConnectResponse | None) -> bool:
        """Queues a frame; False when the agent does not keep up (the stream then ends)."""
        try:
            self.outbox.put_nowait(frame)
        except asyncio.QueueFull:
            return False
        return True

    def free(self) -> int:
        return self.capacity - len(self.held)


class Registry:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        # Keys set (or, as None, removed) through UpdateAgentConfig, by agent id: they take
        # precedence over a reconnecting agent's Hello defaults. Kept for the server's life.
        self.overrides: dict[str, dict[str, Any]] = {}

    def add(self, session: Session) -> Session | None:
        """Registers a session; returns the one it replaces (the same agent connected again)."""
        old = self._sessions.get(session.agent_id)
        self._sessions[session.agent_id] = session
        return old

    def remove(self, session: Session) -> None:
        if self._sessions.get(session.agent_id) is session:
            del self._sessions[session.agent_id]

    def get(self, agent_id: str) -> Session | None:
        return self._sessions.get(agent_id)

    def wake(self, capabilities: set[str]) -> None:
        for session in self._sessions.values():
            if session.free() > 0 and (not capabilities or session.capabilities & capabilities):
                session.wake.set()

    def all(self) -> list[Session]:
        return list(self._sessions.values())
