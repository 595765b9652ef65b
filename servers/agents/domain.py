"""The agent registry of record: every agent that ever connected, in the agents_agents table,
merged with the live sessions of this server (registry.py).

An agent's row is written on connect (its Hello, the API key, online, a fresh session id), on
disconnect (offline, when the row still names this stream's session), and by UpdateAgentConfig
(its overrides, which win over the Hello's configuration, also after a reconnect or a restart).
Each of those writes its event (agent.online, agent.offline, agent.config_updated) to
agents_outbox in the same transaction. agent.overloaded is written when a connected agent's
load reaches its capacity: on that transition only, and at most once per heartbeat interval
(the flag is re-armed by the periodic touch below once the agent has room again).

Online, for an agent not connected to this server, means: its row says online AND its
last_seen_at is within three heartbeat intervals. Heartbeat frames are not written one by one;
instead every server runs ``maintain``, which once per heartbeat interval
- touches its connected agents' rows (last_seen_at, current_load) in one batched transaction,
  so a connected agent's last_seen_at is at most about two intervals old, and
- reaps rows that say online but were not touched for three intervals (their server died or
  lost the database): they are set offline with an agent.offline event (reason
  HEARTBEAT_LOST). On PostgreSQL the reaper takes rows FOR UPDATE SKIP LOCKED, so replicas
  reaping together write one event per agent.
This serves one embedded process and several replicas alike: an agent whose server was killed
reads as offline three intervals after its last touch at the latest, and its row is set offline
at the next reap of any running agents server (at start, the first reap runs at once).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from agentmesh.v1 import agents_pb2
from servers.common.clock import aware, now
from servers.common.context import Principal
from servers.common.db import Database, take_turn
from servers.common.errors import NotFound, RateLimited, ValidationError
from servers.common.pagination import PAGE_MAX_BYTES, Page
from servers.common.protos import NESTING_MAX, json_size, too_deep
from servers.common.text import TYPE_NAME, TYPE_RULE

from .models import AgentRow
from .registry import Registry, Session
from .store import AgentStore, Outbox

log = logging.getLogger("agentmesh.agents")

# Seed 004's words. "overloaded" (above capacity) cannot happen while the server hands out no
# more than the capacity, so no agent shows it today; it is accepted as a filter.
STATUS_WORDS = ("idle", "active", "busy", "overloaded", "offline")
CAPABILITIES_MAX = 32  # of an agent, and of a listing's filter
CONFIG_MAX_BYTES = 64 * 1024
# An agent not touched for this many heartbeat intervals is offline.
STALE_INTERVALS = 3
RESOLVE_MAX_IDS = 100
# Agents one user may have registered (AGENTMESH_AGENTS_PER_OWNER). Every listing reads them
# all, configurations included (up to 64 KiB each); a worker's default name changes with its
# pid, so without a bound, and without forgetting, they pile up.
PER_OWNER = 1000
# Agents offline for longer than AGENTMESH_AGENT_RETENTION_DAYS are deleted, this many per
# transaction, by a job that looks every FORGET_SECONDS.
FORGET_BATCH, FORGET_SECONDS = 500, 300.0


def apply_config(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Sets the changed keys; a None (JSON null) removes the key."""
    merged = dict(base)
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def capabilities_problem(capabilities: Sequence[str]) -> str | None:
    """What is wrong with a list of capabilities (an agent's, or a listing's filter), or None.
    An empty filter value (``?capabilities=``) is refused, not read as a filter nothing
    matches."""
    if len(capabilities) > CAPABILITIES_MAX:
        return f"capabilities: at most {CAPABILITIES_MAX}"
    if any(not TYPE_NAME.fullmatch(c) for c in capabilities):
        return f"each capability is a task type: {TYPE_RULE}"
    return None


def config_problem(configuration: dict[str, Any]) -> str | None:
    """What is wrong with a configuration to keep and hand to the agent, if anything."""
    if json_size(configuration) > CONFIG_MAX_BYTES:
        return "configuration is larger than 64 KiB"
    if too_deep(configuration):
        return f"configuration nests objects and arrays deeper than {NESTING_MAX} levels"
    return None


def _load_status(load: int, capacity: int) -> str:
    if load <= 0:
        return "idle"
    return "busy" if load >= capacity else "active"


def _when(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


@dataclass(frozen=True, kw_only=True)
class View:
    """An agent as readers see it: its row, with live data when it is connected here."""

    agent_id: str
    owner_id: str
    key_id: str
    name: str
    type: str
    status: str
    capabilities: tuple[str, ...]
    current_load: int
    max_capacity: int
    configuration: dict[str, Any]
    version: str
    connected_at: datetime | None
    last_seen_at: datetime | None
    # As its last heartbeat to this server reported them; None when none did.
    resources: agents_pb2.AgentResources | None = None

    @property
    def online(self) -> bool:
        return self.status != "offline"


@dataclass(frozen=True)
class Listing:
    agents: list[View]  # the page asked for (every match without one)
    total: int  # matches in all
    idle: int
    online: int


@dataclass(frozen=True)
class ConfigChange:
    updated_fields: list[str]
    configuration: dict[str, Any]
    # The agent's stream on this server, to tell it at once; None when not connected here.
    session: Session | None


class AgentDirectory:
    """Reads and writes of the registry table; ``close()`` waits for disconnect writes still
    running and is safe to call twice."""

    def __init__(
        self,
        *,
        db: Database,
        registry: Registry,
        heartbeat_seconds: float,
        per_owner: int = PER_OWNER,
    ) -> None:
        self._db = db
        self.registry = registry
        self._heartbeat = heartbeat_seconds
        self._per_owner = per_owner
        self._window = timedelta(seconds=STALE_INTERVALS * heartbeat_seconds)
        self._pending: set[asyncio.Task[None]] = set()

    # -- the stream's life ----------------------------------------------------------------

    async def connect(
        self, session: Session, hello_configuration: dict[str, Any]
    ) -> Session | None:
        """Records the agent online with this session, sets the session's effective
        configuration (the Hello's, overlaid with the stored overrides) and puts it in the
        registry. Returns the session it replaces on this server, if any."""
        at = now()
        replaced: Session | None = None
        added = False
        try:
            async with self._db.write() as s, s.begin():
                store = AgentStore(s)
                row = await store.get(session.agent_id, lock=True)
                if row is None:
                    # New agents of one owner count their places one after another.
                    await take_turn(s, f"agents:{session.owner_id}")
                    if await store.owned(session.owner_id) >= self._per_owner:
                        raise RateLimited(
                            f"you have {self._per_owner} agents registered, the most allowed"
                            " (agents offline for some days are forgotten)",
                            reason="AGENT_LIMIT_REACHED",
                            details={"max_agents": self._per_owner},
                        )
                    row = self._new_row(session, at)
                    if not await store.add(row):
                        # The same agent's first connection on another replica won the insert.
                        row = await store.get(session.agent_id, lock=True)
                        assert row is not None
                row.key_id = session.key_id
                row.name, row.type, row.version = session.name, session.type, session.version
                row.capabilities = sorted(session.capabilities)
                row.max_capacity = session.capacity
                row.configuration = hello_configuration
                row.connected_at = row.last_seen_at = at
                row.online, row.session_id, row.current_load = True, session.session_id, 0
                session.configuration = apply_config(hello_configuration, row.overrides)
                Outbox(s).add(
                    "agent.online",
                    agent_id=row.agent_id,
                    owner_id=row.owner_id,
                    at=at,
                    name=row.name,
                    status="idle",
                    capabilities=row.capabilities,
                    max_capacity=row.max_capacity,
                    version=row.version,
                )
                # In the registry before the commit: an UpdateAgentConfig waiting for this
                # row's lock then finds the session and tells it; one that committed first,
                # we have read.
                replaced, added = self.registry.add(session), True
        except BaseException:
            if added:
                self.registry.restore(session, replaced)
            raise
        return replaced

    @staticmethod
    def _new_row(session: Session, at: datetime) -> AgentRow:
        return AgentRow(
            agent_id=session.agent_id,
            owner_id=session.owner_id,
            key_id=session.key_id,
            name=session.name,
            type=session.type,
            capabilities=sorted(session.capabilities),
            max_capacity=session.capacity,
            configuration={},
            overrides={},
            version=session.version,
            registered_at=at,
            connected_at=at,
            last_seen_at=at,
            online=True,
            session_id=session.session_id,
            current_load=0,
        )

    async def disconnect(self, session: Session, reason: str) -> None:
        """Records the agent offline, unless another stream holds it by now. Runs to its end
        even when the caller is cancelled (a stream cut by the server's shutdown)."""
        task = asyncio.ensure_future(self._disconnect(session, reason))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        await asyncio.shield(task)

    async def _disconnect(self, session: Session, reason: str) -> None:
        at = now()
        try:
            async with self._db.write() as s, s.begin():
                row = await AgentStore(s).get(session.agent_id, lock=True)
                if row is None or not row.online or row.session_id != session.session_id:
                    return
                row.online, row.session_id, row.current_load = False, None, 0
                row.last_seen_at = _when(session.last_seen_at)
                self._offline_event(s, row, at, reason)
        except (SQLAlchemyError, OSError) as exc:
            # The row stays online until the reaper sees it untouched.
            log.warning("could not record an agent offline: %s", exc)

    @staticmethod
    def _offline_event(s: Any, row: AgentRow, at: datetime, reason: str) -> None:
        Outbox(s).add(
            "agent.offline",
            agent_id=row.agent_id,
            owner_id=row.owner_id,
            at=at,
            name=row.name,
            status="offline",
            capabilities=list(row.capabilities),
            reason=reason,
            last_seen_at=aware(row.last_seen_at).isoformat() if row.last_seen_at else "",
        )

    async def overloaded(self, session: Session) -> None:
        """Writes agent.overloaded when the session just became full and the flag is armed."""
        if not session.overload_armed or session.free() > 0:
            return
        session.overload_armed = False
        at = now()
        async with self._db.write() as s, s.begin():
            Outbox(s).add(
                "agent.overloaded",
                agent_id=session.agent_id,
                owner_id=session.owner_id,
                at=at,
                name=session.name,
                status=session.status(),
                capabilities=sorted(session.capabilities),
                current_load=len(session.held),
                max_capacity=session.capacity,
            )

    # -- liveness -------------------------------------------------------------------------

    async def maintain(self) -> None:
        """Runs for the life of the server: touch, then reap, once per heartbeat interval."""
        while True:
            try:
                await self.touch()
                await self.reap()
            except Exception:  # a database hiccup must not end the job
                log.exception("agent registry upkeep failed")
            await asyncio.sleep(self._heartbeat)

    async def touch(self) -> None:
        """Writes the connected agents' last_seen_at and load, in one transaction."""
        sessions = self.registry.all()
        for session in sessions:
            if session.free() > 0:
                session.overload_armed = True
        if not sessions:
            return
        seen = [
            {
                "agent_id": x.agent_id,
                "session_id": x.session_id,
                "last_seen_at": _when(x.last_seen_at),
                "current_load": len(x.held),
            }
            for x in sessions
        ]
        async with self._db.write() as s, s.begin():
            await AgentStore(s).touch(seen)

    async def reap(self) -> list[str]:
        """Sets offline the agents that say online but were not touched for three heartbeat
        intervals and are not connected here; returns their ids."""
        at = now()
        before = at - self._window
        # Look first without the write lock: most of the time there is nothing to do.
        async with self._db.session() as s:
            if not await AgentStore(s).stale(before, lock=False):
                return []
        here = {x.agent_id for x in self.registry.all()}
        reaped: list[str] = []
        async with self._db.write() as s, s.begin():
            for row in await AgentStore(s).stale(before, lock=not self._db.is_sqlite):
                if row.agent_id in here or not self._stale(row, before):
                    continue
                row.online, row.session_id, row.current_load = False, None, 0
                self._offline_event(s, row, at, "HEARTBEAT_LOST")
                reaped.append(row.agent_id)
        if reaped:
            log.info("agents marked offline after missed heartbeats: %d", len(reaped))
        return reaped

    async def forget(self, before: datetime, *, batch: int = FORGET_BATCH) -> int:
        """Deletes the agents offline and unheard of since before ``before``, a batch per
        transaction; returns how many. Their tasks keep the id in ``assigned_agent``."""
        forgotten = 0
        while True:
            async with self._db.write() as s, s.begin():
                ids = await AgentStore(s).forget(before, batch)
            forgotten += len(ids)
            if len(ids) < batch:
                return forgotten

    async def keep_for(self, retention: timedelta, every: float = FORGET_SECONDS) -> None:
        """Runs for the life of the server: forgets agents offline for longer than
        ``retention``, every ``every`` seconds."""
        while True:
            try:
                if forgotten := await self.forget(now() - retention):
                    log.info("agents offline for too long forgotten: %d", forgotten)
            except Exception:  # a database hiccup must not end the job
                log.exception("forgetting offline agents failed")
            await asyncio.sleep(every)

    @staticmethod
    def _stale(row: AgentRow, before: datetime) -> bool:
        return row.last_seen_at is None or aware(row.last_seen_at) < before

    # -- reads ----------------------------------------------------------------------------

    def view(self, row: AgentRow, at: datetime, *, configured: bool = True) -> View:
        """``configured``: False for a row read without its configuration columns (its
        view's configuration is then empty, unless its session is here)."""
        session = self.registry.get(row.agent_id)
        if session is not None:
            return View(
                agent_id=session.agent_id,
                owner_id=session.owner_id,
                key_id=session.key_id,
                name=session.name,
                type=session.type,
                status=session.status(),
                capabilities=tuple(sorted(session.capabilities)),
                current_load=len(session.held),
                max_capacity=session.capacity,
                configuration=session.configuration,
                version=session.version,
                connected_at=_when(session.connected_at),
                last_seen_at=_when(session.last_seen_at),
                resources=session.resources,
            )
        online = row.online and not self._stale(row, at - self._window)
        return View(
            agent_id=row.agent_id,
            owner_id=row.owner_id,
            key_id=row.key_id,
            name=row.name,
            type=row.type,
            status=_load_status(row.current_load, row.max_capacity) if online else "offline",
            capabilities=tuple(sorted(row.capabilities)),
            current_load=row.current_load if online else 0,
            max_capacity=row.max_capacity,
            configuration=apply_config(row.configuration, row.overrides) if configured else {},
            version=row.version,
            connected_at=aware(row.connected_at) if online and row.connected_at else None,
            last_seen_at=aware(row.last_seen_at) if row.last_seen_at else None,
        )

    async def listing(
        self, who: Principal, status: str, capabilities: Sequence[str], page: Page | None = None
    ) -> Listing:
        """The agents the caller may see that match the filters, by name: those of ``page``
        (all without one), with the counts of all. Configurations (64 KiB each at most, and as
        much of overrides) are read for the page only, and only within PAGE_MAX_BYTES
        characters after the first agent's: the page ends early past that."""
        if status and status not in STATUS_WORDS:
            raise ValidationError(
                f"status must be one of {', '.join(STATUS_WORDS)}", details={"field": "status"}
            )
        if problem := capabilities_problem(capabilities):
            raise ValidationError(problem, details={"field": "capabilities"})
        owner = None if "admin" in who.roles else who.subject
        async with self._db.session() as s:
            store = AgentStore(s)
            rows = await store.visible(owner, configured=False)
            at = now()
            wanted = set(capabilities)
            views = [
                v
                for v in (self.view(row, at, configured=False) for row in rows)
                if wanted <= set(v.capabilities) and (not status or v.status == status)
            ]
            shown = views if page is None else views[page.offset : page.offset + page.limit]
            here = {v.agent_id for v in shown if self.registry.get(v.agent_id) is not None}
            if page is not None:
                sizes = await store.configuration_sizes(
                    [v.agent_id for v in shown if v.agent_id not in here]
                )
                shown = _within(shown, sizes, PAGE_MAX_BYTES)
            stored = await store.configurations(
                [v.agent_id for v in shown if v.agent_id not in here]
            )
        return Listing(
            agents=[
                replace(v, configuration=apply_config(*stored[v.agent_id]))
                if v.agent_id in stored
                else v
                for v in shown
            ],
            total=len(views),
            idle=sum(1 for v in views if v.status == "idle"),
            online=sum(1 for v in views if v.online),
        )

    async def counts(self) -> tuple[int, int]:
        """(registered, online), mesh-wide, by the rule of ``view``."""
        async with self._db.session() as s:
            return await AgentStore(s).counts(now() - self._window)

    async def get(self, who: Principal, agent_id: str) -> View:
        async with self._db.session() as s:
            row = await AgentStore(s).get(agent_id)
        if row is None or not _may_see(who, row):
            raise _not_found(agent_id)
        return self.view(row, now())

    async def configuration(self, agent_id: str) -> dict[str, Any] | None:
        """The agent's stored configuration, its overrides applied; None for an unknown one."""
        async with self._db.session() as s:
            row = await AgentStore(s).get(agent_id)
        return None if row is None else apply_config(row.configuration, row.overrides)

    async def known(self, agent_id: str) -> bool:
        async with self._db.session() as s:
            return await AgentStore(s).get(agent_id) is not None

    async def resolve(self, agent_ids: Sequence[str], key_id: str) -> list[View]:
        """Agents by id and/or by the API key they last connected with, online or not."""
        if len(agent_ids) > RESOLVE_MAX_IDS:
            raise ValidationError(
                f"at most {RESOLVE_MAX_IDS} agent_ids",
                details={"field": "agent_ids", "max": RESOLVE_MAX_IDS},
            )
        if not agent_ids and not key_id:
            raise ValidationError("give agent_ids or key_id", details={"field": "agent_ids"})
        async with self._db.session() as s:
            rows = await AgentStore(s).resolve(agent_ids, key_id)
        at = now()
        return [self.view(row, at) for row in rows]

    # -- configuration --------------------------------------------------------------------

    async def configure(
        self, who: Principal, agent_id: str, body: dict[str, Any], paths: Sequence[str]
    ) -> ConfigChange:
        """UpdateAgentConfig's rules (see its proto comment); the changes are stored as
        overrides, which outlive the connection and the server."""
        if problem := config_problem(body):
            raise ValidationError(problem, details={"field": "configuration"})
        if any(not path or "." in path for path in paths if path != "*"):
            raise ValidationError(
                "update_mask paths are top-level keys", details={"field": "update_mask"}
            )
        at = now()
        async with self._db.write() as s, s.begin():
            row = await AgentStore(s).get(agent_id, lock=True)
            if row is None or not _may_see(who, row):
                raise _not_found(agent_id)
            current = apply_config(row.configuration, row.overrides)
            if "*" in paths:
                changes: dict[str, Any] = {k: None for k in current} | body
            elif paths:
                changes = {path: body.get(path) for path in paths}
            else:
                changes = body
            # A new dict, so that the JSON column is seen to change. A removal (null) is kept
            # only for a key the agent's own configuration has: one of a key it lacks would
            # change nothing, and kept, such keys could pile up without bound.
            merged = {**row.overrides, **changes}
            row.overrides = {
                k: v for k, v in merged.items() if v is not None or k in row.configuration
            }
            configuration = apply_config(row.configuration, row.overrides)
            if problem := config_problem(configuration):
                raise ValidationError(problem, details={"field": "configuration"})
            session = self.registry.get(agent_id)
            if session is not None:
                session.configuration = configuration
            updated = sorted(changes)
            Outbox(s).add(
                "agent.config_updated",
                agent_id=row.agent_id,
                owner_id=row.owner_id,
                at=at,
                name=row.name,
                status=self.view(row, at).status,
                capabilities=list(row.capabilities),
                updated_fields=updated,
            )
        return ConfigChange(updated, configuration, session)

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=5)


def _within(views: list[View], sizes: dict[str, int], budget: int) -> list[View]:
    """The leading views whose stored configurations, before each, stay within ``budget``
    characters (the first always)."""
    used = 0
    for kept, view in enumerate(views):
        if kept and used > budget:
            return views[:kept]
        used += sizes.get(view.agent_id, 0)
    return views


def _may_see(who: Principal, row: AgentRow) -> bool:
    return row.owner_id == who.subject or "admin" in who.roles


def _not_found(agent_id: str) -> NotFound:
    return NotFound("no such agent", details={"agent_id": agent_id[:64]})
