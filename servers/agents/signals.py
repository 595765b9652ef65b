"""What one agents replica tells the others, so that an agent may be connected to any of them
(DESIGN.md, Operations).

A replica holds the sessions of the agents connected to it (registry.py), but the tasks service
and REST callers reach whichever replica gRPC's balancer or Envoy picks. So a replica asked to
reach an agent does what it can here and publishes a signal on the bus topic "agents", which
every agents process follows; each acts on the others' signals for the sessions it holds:

- ``wake``: tasks needing these capabilities were queued (NotifyTasksAvailable). Each replica
  wakes one able session per task, as registry.py's ``wake`` does in one process; the claims of
  all but one come back empty. Coalesced: one entry per turn of the loop, with each capability
  set and how many tasks needed it.
- ``cancel``: DeliverCancellation for an agent whose session here does not hold the task.
- ``config``: UpdateAgentConfig of an agent not connected here. The replica holding it reads the
  stored configuration (so an entry stays small) and sends the agent a ConfigUpdate.
- ``replaced``: a Connect agent connected here; an older Connect session of it elsewhere ends
  with REPLACED, as it would here (older by the replicas' clocks: a tie-break for an agent
  that reconnects twice within the signal's way). HTTP agents are left alone: Envoy sends an
  HTTP agent's calls to one replica, but its registration may land on another, whose session
  of it then lapses after three silent heartbeat intervals.

Signals only hasten: a lost one costs latency, never work. Dispatchers poll for work, a
cancelled task's lease is not renewed at the agent's next heartbeat, a replaced stream falls
quiet and ends, and an agent reads its configuration at every connection. With the in-process
bus there is no other replica, and nothing is published.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from agentmesh.v1 import agents_pb2
from servers.common.broadcast import Broadcast
from servers.common.bus import Bus
from servers.common.follower import Follower
from servers.common.protos import struct

from .registry import Registry, Session
from .work import CANCEL_MESSAGE_MAX, cancellation_frame, end_frame

log = logging.getLogger("agentmesh.agents")

TOPIC = "agents"
# Wake-ups: a replica that misses them polls, so only a short tail is kept.
RETENTION_MS = 60_000
MAX_LEN = 10_000
# Capability sets per wake entry; a turn with more publishes several entries.
WAKE_SETS = 100
# A config signal names its updated fields only while they are this short (as JSON); past it,
# the agent is sent the whole configuration without them.
FIELDS_MAX = 4096
# Configuration reads of config signals in flight; more are dropped (the agent reads its
# configuration when it connects again).
READS_MAX = 64

# Reads an agent's stored configuration (overrides applied); None for an unknown agent.
ReadConfiguration = Callable[[str], Awaitable[dict[str, Any] | None]]


def deliver_cancellation(
    session: Session, task_id: str, reason: str, attempt_token: str, message: str = ""
) -> None:
    """Tells the session's agent to stop a task. A token names one attempt: a newer attempt of
    the task that the agent holds now keeps its place."""
    session.drop(task_id, attempt_token)
    session.send(cancellation_frame(task_id, reason or "CANCELLED", attempt_token, message))
    session.wake.set()


def send_configuration(
    session: Session, configuration: dict[str, Any], updated_fields: list[str]
) -> None:
    session.configuration = configuration
    session.send(
        agents_pb2.ConnectResponse(
            config_update=agents_pb2.ConfigUpdate(
                configuration=struct(configuration), updated_fields=updated_fields
            )
        )
    )


class Signals:
    """This replica's side: acts here at once, publishes for the others, and acts on theirs.
    ``bus`` and ``follower`` are None in one process (nothing is published)."""

    def __init__(
        self,
        registry: Registry,
        *,
        read_configuration: ReadConfiguration,
        bus: Bus | None = None,
        follower: Follower | None = None,
    ) -> None:
        self._registry = registry
        self._read_configuration = read_configuration
        self._broadcast = (
            None
            if bus is None
            else Broadcast(
                bus,
                follower,
                topic=TOPIC,
                what="agents signals",
                log=log,
                retention_ms=RETENTION_MS,
                max_len=MAX_LEN,
            )
        )
        # Capability sets of the tasks made available this turn, and how many tasks each.
        self._waking: collections.Counter[frozenset[str]] = collections.Counter()
        self._jobs: set[asyncio.Task[None]] = set()
        self._flushing: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._broadcast is not None:
            self._broadcast.start(self._act)

    async def close(self) -> None:
        if self._broadcast is not None:
            self._broadcast.stop()
        jobs = [*self._jobs, *([self._flushing] if self._flushing else [])]
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    # -- what this replica was asked -------------------------------------------------------

    def tasks_available(self, capabilities: frozenset[str]) -> None:
        self._registry.wake(set(capabilities))
        if self._broadcast is None:
            return
        self._waking[capabilities] += 1
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush_wakes())

    async def cancel(
        self, agent_id: str, task_id: str, reason: str, attempt_token: str, message: str = ""
    ) -> None:
        session = self._registry.get(agent_id)
        if session is not None:
            holds = task_id in session.held
            deliver_cancellation(session, task_id, reason, attempt_token, message)
            if holds:
                return
        # Not held here: the agent may be connected to another replica (or have reconnected
        # there while this session of it has not noticed yet).
        await self._publish(
            {
                "kind": "cancel",
                "agent_id": agent_id,
                "task_id": task_id,
                "reason": reason,
                "attempt_token": attempt_token,
                "message": message[:CANCEL_MESSAGE_MAX],
            }
        )

    async def configured(
        self,
        agent_id: str,
        session: Session | None,
        configuration: dict[str, Any],
        updated: list[str],
    ) -> None:
        """UpdateAgentConfig stored a change; ``session``: the agent's session here, if any."""
        if session is not None:
            send_configuration(session, configuration, updated)
            return
        fields = json.dumps(updated)
        await self._publish(
            {
                "kind": "config",
                "agent_id": agent_id,
                "fields": fields if len(fields) <= FIELDS_MAX else "[]",
            }
        )

    async def connected(self, session: Session) -> None:
        """A Connect session of the agent began here: older ones elsewhere end."""
        if not session.http:
            await self._publish(
                {
                    "kind": "replaced",
                    "agent_id": session.agent_id,
                    "session_id": session.session_id,
                    "connected_at": repr(session.connected_at),
                }
            )

    # -- the bus -----------------------------------------------------------------------------

    async def _flush_wakes(self) -> None:
        await asyncio.sleep(0)  # the rest of this turn's tasks join the entry
        while self._waking:
            batch, self._waking = self._waking, collections.Counter()
            sets = [[sorted(c), n] for c, n in batch.items()]
            for start in range(0, len(sets), WAKE_SETS):
                await self._publish(
                    {"kind": "wake", "sets": json.dumps(sets[start : start + WAKE_SETS])}
                )

    async def _publish(self, fields: Mapping[str, str]) -> None:
        # A signal lost to a bus outage: the other replicas find out the slow way (see the
        # module's docstring).
        if self._broadcast is not None:
            await self._broadcast.publish(fields)

    def _act(self, fields: Mapping[str, str]) -> None:
        kind = fields.get("kind")
        if kind == "wake":
            sessions = len(self._registry.all())
            for capabilities, count in json.loads(fields["sets"]):
                if not isinstance(capabilities, list) or not all(
                    isinstance(c, str) for c in capabilities
                ):
                    raise TypeError("capabilities must be a list of strings")
                # More wakes than sessions here would wake none more.
                for _ in range(min(int(count), sessions)):
                    self._registry.wake(set(capabilities))
            return
        session = self._registry.get(fields["agent_id"])
        if session is None:
            return
        if kind == "cancel":
            deliver_cancellation(
                session,
                fields["task_id"],
                fields["reason"],
                fields["attempt_token"],
                # A replica of an older release publishes no message.
                fields.get("message", ""),
            )
        elif kind == "config":
            updated = json.loads(fields["fields"])
            if not isinstance(updated, list) or not all(isinstance(f, str) for f in updated):
                raise TypeError("fields must be a list of strings")
            if len(self._jobs) >= READS_MAX:
                log.warning("too many configuration reads at once; a config signal is dropped")
                return
            job = asyncio.ensure_future(self._reconfigure(session, updated))
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)
        elif kind == "replaced":
            # Only an older session ends: an agent that connected here again since (the
            # signal was on its way) keeps its new stream.
            newer = float(fields["connected_at"])
            if not session.http and session.connected_at < newer:
                session.send(end_frame("REPLACED"))

    async def _reconfigure(self, session: Session, updated: list[str]) -> None:
        try:
            configuration = await self._read_configuration(session.agent_id)
        except Exception:  # a database hiccup: the agent reads it at its next connection
            log.exception("could not read an agent's configuration for its update")
            return
        if configuration is not None and self._registry.get(session.agent_id) is session:
            send_configuration(session, configuration, updated)
