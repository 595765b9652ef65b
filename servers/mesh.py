"""The embedded mesh (`agentmesh up`): all four services in one process, each on its own port,
and Envoy as a supervised child, exactly as Envoy routes them in production.

This module is the only place that knows every service; the services never import each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from agentmesh.v1 import (
    agents_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    events_pb2_grpc,
    health_pb2_grpc,
    messaging_pb2_grpc,
    metrics_pb2_grpc,
    tasks_pb2_grpc,
    users_pb2_grpc,
)
from gateway.proxy import EdgeConfig, EnvoyFailed, EnvoyProcess

from .agents.domain import AgentDirectory
from .agents.models import OutboxRow as AgentsOutboxRow
from .agents.registry import QUIET_INTERVALS, Registry
from .agents.service import AgentsInternalService, AgentsService
from .agents.signals import TOPIC as AGENTS_TOPIC
from .agents.signals import Signals
from .auth.admin import UserAdmin
from .auth.apikeys import ApiKeys
from .auth.domain import Accounts, LoginLimits
from .auth.invalidations import TOPIC as AUTH_TOPIC
from .auth.invalidations import USER_ID_MAX, Invalidations
from .auth.keys import SigningKey, write_once
from .auth.models import OutboxRow as AuthOutboxRow
from .auth.profiles import AccountCache
from .auth.service import AuthInternalService, AuthService, UsersService
from .common.auth import (
    SESSION_ID_MAX,
    ApiKeyClient,
    ApiKeyResolver,
    Authenticator,
    KnownCutoffs,
    TokenVerifier,
    follow_cutoffs,
)
from .common.bus import Bus, open_bus
from .common.config import SERVICES, Settings
from .common.context import Principal
from .common.db import Database
from .common.follower import Follower
from .common.health import HealthService
from .common.interceptors import default_interceptors
from .common.internal import InternalChannel
from .common.jobs import stop_jobs
from .common.metrics import Host, Metrics
from .common.outbox import OutboxMixin, Relay
from .common.quotas import Quotas
from .common.ratelimit import SlidingWindowLimiter
from .common.scrape import ScrapeServer
from .common.server import PortInUse, ServiceServer
from .common.tracing import Tracing
from .messaging.domain import RATE_WINDOW as MESSAGE_RATE_WINDOW
from .messaging.domain import Messages
from .messaging.events import EventHub, EventsService
from .messaging.hub import TOPIC as MESSAGES_TOPIC
from .messaging.hub import InboxHub
from .messaging.messages import MessagingService
from .messaging.resolver import AgentResolver
from .tasks.callbacks import CallbackWorker
from .tasks.dispatch import Dispatch
from .tasks.domain import Tasks
from .tasks.metrics import MetricsService
from .tasks.models import OutboxRow as TasksOutboxRow
from .tasks.service import Agents, TasksInternalService, TasksService

log = logging.getLogger("agentmesh.mesh")

SERVERS_DIR = Path(__file__).resolve().parent
# Each entry: the service's migrations folder (None: owns no tables yet).
MIGRATIONS: dict[str, Path | None] = {
    "auth": SERVERS_DIR / "auth" / "migrations",
    "tasks": SERVERS_DIR / "tasks" / "migrations",
    "agents": SERVERS_DIR / "agents" / "migrations",
    "messaging": SERVERS_DIR / "messaging" / "migrations",
}


@dataclass
class Runtime:
    """What the services of one process share: settings, database, keys, token checks."""

    settings: Settings
    db: Database
    key: SigningKey
    verifier: TokenVerifier
    internal_token: str
    limits: LoginLimits
    bus: Bus
    # Every server's request quotas: one count per principal across the process's servers.
    quotas: Quotas
    # Spans of the process's RPCs and statements, when a collector is configured.
    tracing: Tracing | None = None
    peers: dict[str, str] = field(default_factory=dict)
    # The auth service's own API-key check, when the auth service runs in this process: the
    # other services' servers use it as the auth server does, rather than asking it over a
    # loopback gRPC call (VerifyApiKey, which runs this same check). Same answers, same cache
    # and revocation; about 0.8 ms less per API-key request on this machine.
    api_keys_here: ApiKeyResolver | None = None
    # The internal servicers of this process by service name: a call to one of them through
    # internal_channel() is made in place (servers/common/internal.py).
    local_servicers: dict[str, object] = field(default_factory=dict)
    # The process's Prometheus metrics: every server's calls, and what the services set.
    metrics: Metrics = field(default_factory=Metrics)
    # The text of its metrics port: with the tasks service here, what GET /metrics answers.
    prometheus: Callable[[], Awaitable[bytes]] | None = None
    # Set when the process starts to stop: open streams end with StreamEnd("SERVER_SHUTDOWN").
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    _stop_hooks: list[Callable[[], None]] = field(default_factory=list)
    _followers: dict[str, Follower] = field(default_factory=dict)
    _jobs: list[asyncio.Task[None]] = field(default_factory=list)
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _api_key_client: ApiKeyClient | None = None

    @classmethod
    async def open(cls, settings: Settings) -> Runtime:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.database_url)
        try:
            for service, folder in MIGRATIONS.items():
                if folder is not None:
                    await db.migrate(service, folder)
        except BaseException:
            await db.close()
            raise
        key = SigningKey.load_or_create(settings.data_dir)
        key.write_jwks(settings.data_dir / "jwks.json")
        verifier = TokenVerifier(
            jwks=key.jwks, issuer=settings.jwt_issuer, audience=settings.jwt_audience
        )

        def limiter(name: str, limit: int) -> SlidingWindowLimiter:
            return SlidingWindowLimiter(
                name=name,
                limit=limit,
                window=settings.login_window,
                redis_url=settings.redis_url,
                prefix=settings.bus_prefix,
            )

        limits = LoginLimits(
            per_address=limiter("login-address", settings.login_limit),
            per_account=limiter("login-account", settings.login_limit),
            registrations=limiter("register-address", settings.register_limit),
        )
        return cls(
            settings=settings,
            db=db,
            key=key,
            verifier=verifier,
            internal_token=internal_token(settings.data_dir),
            limits=limits,
            bus=open_bus(settings.redis_url, prefix=settings.bus_prefix),
            quotas=Quotas(
                settings.quotas,
                tiers=settings.tiers,
                default_tier=settings.default_tier,
                redis_url=settings.redis_url,
                prefix=settings.bus_prefix,
            ),
            tracing=_tracing(settings, db),
        )

    def authenticator(self, api_keys: ApiKeyResolver | None = None) -> Authenticator:
        """Token checks for one server; API keys go to the auth service unless resolved here."""
        if api_keys is None:
            api_keys = self.api_keys_here
        if api_keys is None:
            if self._api_key_client is None:  # one channel to the auth service per process
                self._api_key_client = ApiKeyClient(
                    address=lambda: self.peers["auth"], internal_token=self.internal_token
                )
                self._closers.append(self._api_key_client.close)
            api_keys = self._api_key_client
        return Authenticator(
            verifier=self.verifier, internal_token=self.internal_token, api_keys=api_keys
        )

    def scrape_server(self) -> ScrapeServer | None:
        """The process's own metrics port, when AGENTMESH_METRICS_PORT is set. Made after the
        process's servers, whose API-key check it shares."""
        if self.settings.metrics_port is None:
            return None
        metrics = self.metrics

        async def own() -> bytes:
            return metrics.render()

        return ScrapeServer(
            host=self.settings.host,
            port=self.settings.metrics_port,
            authenticator=self.authenticator(),
            quotas=self.quotas,
            render=self.prometheus or own,
            avoid=frozenset({self.settings.public_port, self.settings.admin_port} - {0}),
        )

    def internal_channel(self, service: str) -> InternalChannel:
        """A channel to another service of the mesh, closed with the runtime."""
        channel = InternalChannel(
            address=lambda: self.peers[service],
            internal_token=self.internal_token,
            local=self.local_servicers,
        )
        self._closers.append(channel.close)
        return channel

    def follow_token_cutoffs(self) -> None:
        """Keeps the process's token checks told of the tokens that changes to their accounts
        ended (servers/auth/cutoffs.py), from the auth service, in place when it runs here.
        Started once the process's servers have their addresses."""
        channel = self.internal_channel("auth")

        async def fetch() -> KnownCutoffs:
            stub = channel.stub(auth_pb2_grpc.AuthInternalServiceStub)
            reply = await stub.ListTokenCutoffs(
                auth_pb2.ListTokenCutoffsRequest(), **channel.call_options()
            )
            return KnownCutoffs(
                accounts=[
                    (c.user_id, c.min_generation, c.expires_at.ToSeconds())
                    for c in reply.cutoffs
                    if 0 < len(c.user_id) <= USER_ID_MAX
                ],
                sessions=[
                    (c.session_id, c.expires_at.ToSeconds())
                    for c in reply.sessions
                    if 0 < len(c.session_id) <= SESSION_ID_MAX
                ],
            )

        every = self.settings.token_cutoff_poll_seconds
        job = follow_cutoffs(self.verifier.cutoffs, fetch, every)
        self._jobs.append(asyncio.ensure_future(job))

    def on_close(self, close: Callable[[], Awaitable[None]]) -> None:
        self._closers.append(close)

    def on_stop(self, hook: Callable[[], None]) -> None:
        """Runs ``hook`` when the process starts to stop, before servers drain."""
        self._stop_hooks.append(hook)

    def stopping(self) -> None:
        """Tells open streams to end now (StreamEnd "SERVER_SHUTDOWN")."""
        self.closing.set()
        for hook in self._stop_hooks:
            hook()

    def follower(self, topic: str) -> Follower:
        """The process's one reader of a bus topic, started on first use."""
        follower = self._followers.get(topic)
        if follower is None:
            follower = self._followers[topic] = Follower(self.bus, topic)
            self._jobs.append(asyncio.ensure_future(follower.run()))
        return follower

    def relay(self, model: type[OutboxMixin]) -> Relay:
        """A relay of a service's outbox to the events topic (run it as a background job)."""
        return Relay(
            db=self.db,
            model=model,
            bus=self.bus,
            retention_seconds=self.settings.event_retention_seconds,
            max_len=self.settings.event_retention_max,
        )

    async def close(self) -> None:
        self.stopping()
        await stop_jobs(self._jobs, patience=self.settings.grace_seconds)
        self._jobs.clear()
        for close in self._closers:
            await close()
        self._closers.clear()
        await self.bus.close()
        await self.limits.close()
        await self.quotas.close()
        if self.tracing is not None:
            await self.tracing.close()
        await self.db.close()


def _tracing(settings: Settings, db: Database) -> Tracing | None:
    """Tracing with the database's statements instrumented, when a collector is configured."""
    if not settings.tracing:
        return None
    tracing = Tracing(version=settings.version)
    for engine in db.sync_engines():
        tracing.instrument(engine)
    return tracing


def internal_token(data_dir: Path) -> str:
    """The credential mesh services present to each other's internal RPCs.

    AGENTMESH_INTERNAL_TOKEN wins (replicas on several hosts share it); otherwise it is created
    once in the data directory.
    """
    return _secret(data_dir, "internal-token", "AGENTMESH_INTERNAL_TOKEN")


def callback_secret(data_dir: Path) -> str:
    """The key task callbacks are signed with (servers/tasks/callbacks.py): from
    AGENTMESH_CALLBACK_SECRET (replicas share it), or created once in the data directory."""
    return _secret(data_dir, "callback-secret", "AGENTMESH_CALLBACK_SECRET")


def _secret(data_dir: Path, name: str, variable: str) -> str:
    if value := os.environ.get(variable):
        return value
    path = data_dir / "keys" / name
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        write_once(path, secrets.token_urlsafe(32).encode())
    return path.read_text().strip()


Servicers = list[tuple[Callable[[Any, Any], None], Any, str]]
Job = Callable[[], Awaitable[None]]


def _servicers(name: str, rt: Runtime) -> tuple[Servicers, Authenticator, list[Job]]:
    """(add-to-server function, servicer, full service name) of a service's servicers, the
    authenticator its server checks calls with, and its background jobs."""
    s = rt.settings
    if name == "auth":
        cache = AccountCache(ttl=s.auth_cache_seconds)
        if s.redis_url:
            # Other auth replicas forget what this one's writes change (the in-process bus has
            # only this process to tell).
            invalidations = Invalidations(cache, bus=rt.bus, follower=rt.follower(AUTH_TOPIC))
            invalidations.start()
            rt.on_close(invalidations.close)
        accounts = Accounts(
            db=rt.db,
            key=rt.key,
            issuer=s.jwt_issuer,
            audience=s.jwt_audience,
            access_ttl=s.access_token_ttl,
            limits=rt.limits,
            cache=cache,
            cutoffs=rt.verifier.cutoffs,
        )
        api_keys = ApiKeys(db=rt.db, cache=cache)

        async def resolve_locally(secret: str) -> Principal:
            return (await api_keys.verify(secret))[2]

        rt.api_keys_here = resolve_locally
        admin = UserAdmin(
            db=rt.db, cache=cache, access_ttl=s.access_token_ttl, cutoffs=rt.verifier.cutoffs
        )

        return (
            [
                (
                    auth_pb2_grpc.add_AuthServiceServicer_to_server,
                    AuthService(accounts=accounts, api_keys=api_keys, key=rt.key),
                    "agentmesh.v1.AuthService",
                ),
                (
                    users_pb2_grpc.add_UsersServiceServicer_to_server,
                    UsersService(admin=admin),
                    "agentmesh.v1.UsersService",
                ),
                (
                    auth_pb2_grpc.add_AuthInternalServiceServicer_to_server,
                    AuthInternalService(api_keys=api_keys, admin=admin),
                    "agentmesh.v1.AuthInternalService",
                ),
            ],
            rt.authenticator(resolve_locally),
            [rt.relay(AuthOutboxRow).run],
        )
    if name == "tasks":
        agents = Agents(rt.internal_channel("agents"))
        rt.on_close(agents.close)
        internal = TasksInternalService(
            dispatch=Dispatch(db=rt.db, lease_seconds=s.lease_seconds),
            agents=agents,
            metrics=rt.metrics,
        )
        tasks = Tasks(
            db=rt.db,
            timeout_seconds=s.task_timeout_seconds,
            open_per_user=s.open_tasks_per_user,
        )
        callbacks = CallbackWorker(
            db=rt.db,
            bus=rt.bus,
            secret=callback_secret(s.data_dir),
            allow_private=s.callback_allow_private,
        )
        relay = rt.relay(TasksOutboxRow)

        async def relay_once_callbacks_listen() -> None:
            # The callbacks' consumer group starts at the topic's end: events published before
            # it exists would never be called back.
            await callbacks.started.wait()
            await relay.run()

        async def retention() -> None:
            await tasks.keep_for(timedelta(days=s.task_retention_days))

        metrics_service = MetricsService(
            tasks=tasks, agents=agents, metrics=rt.metrics, host=Host(s.data_dir)
        )
        rt.prometheus = metrics_service.prometheus
        return (
            [
                (
                    tasks_pb2_grpc.add_TasksServiceServicer_to_server,
                    TasksService(tasks=tasks, agents=agents),
                    "agentmesh.v1.TasksService",
                ),
                (
                    metrics_pb2_grpc.add_MetricsServiceServicer_to_server,
                    metrics_service,
                    "agentmesh.v1.MetricsService",
                ),
                (
                    tasks_pb2_grpc.add_TasksInternalServiceServicer_to_server,
                    internal,
                    "agentmesh.v1.TasksInternalService",
                ),
            ],
            rt.authenticator(),
            [
                internal.sweep,
                callbacks.run,
                relay_once_callbacks_listen,
                *([retention] if s.task_retention_days > 0 else []),
            ],
        )
    if name == "agents":
        directory = AgentDirectory(
            db=rt.db,
            registry=Registry(quiet_after=QUIET_INTERVALS * s.heartbeat_seconds),
            heartbeat_seconds=s.heartbeat_seconds,
            per_owner=s.agents_per_owner,
        )

        async def forget_offline() -> None:
            await directory.keep_for(timedelta(days=s.agent_retention_days))

        rt.on_close(directory.close)
        # With Redis, other agents replicas may hold the streams this one is asked to reach;
        # the in-process bus has only this process to tell.
        signals = Signals(
            directory.registry,
            read_configuration=directory.configuration,
            bus=rt.bus if s.redis_url else None,
            follower=rt.follower(AGENTS_TOPIC) if s.redis_url else None,
        )
        signals.start()
        rt.on_close(signals.close)
        authenticator = rt.authenticator()
        agents_service = AgentsService(
            directory=directory,
            tasks=rt.internal_channel("tasks"),
            heartbeat_seconds=s.heartbeat_seconds,
            lease_seconds=s.lease_seconds,
            signals=signals,
            poll_seconds=s.claim_poll_seconds,
            closing=rt.closing,
            authenticator=authenticator,
        )
        return (
            [
                (
                    agents_pb2_grpc.add_AgentsServiceServicer_to_server,
                    agents_service,
                    "agentmesh.v1.AgentsService",
                ),
                (
                    agents_pb2_grpc.add_AgentsInternalServiceServicer_to_server,
                    AgentsInternalService(directory=directory, signals=signals),
                    "agentmesh.v1.AgentsInternalService",
                ),
            ],
            authenticator,
            [
                directory.maintain,
                agents_service.expire_http_agents,
                rt.relay(AgentsOutboxRow).run,
                *([forget_offline] if s.agent_retention_days > 0 else []),
            ],
        )
    if name == "messaging":
        inbox_hub = InboxHub(bus=rt.bus, follower=rt.follower(MESSAGES_TOPIC))
        inbox_hub.start()
        message_limit = SlidingWindowLimiter(
            name="messages",
            limit=s.message_rate_limit,
            window=MESSAGE_RATE_WINDOW,
            redis_url=s.redis_url,
            prefix=s.bus_prefix,
        )
        rt.on_close(message_limit.close)
        messages = Messages(
            db=rt.db,
            hub=inbox_hub,
            limiter=message_limit,
            poll_seconds=s.stream_heartbeat_seconds,
            max_unacked=s.inbox_max_unacked,
        )
        hub = EventHub(rt.follower("events"))
        rt.on_stop(hub.shutdown)
        authenticator = rt.authenticator()
        return (
            [
                (
                    messaging_pb2_grpc.add_MessagingServiceServicer_to_server,
                    MessagingService(
                        messages=messages,
                        resolver=AgentResolver(rt.internal_channel("agents")),
                        heartbeat_seconds=s.stream_heartbeat_seconds,
                        closing=rt.closing,
                        authenticator=authenticator,
                    ),
                    "agentmesh.v1.MessagingService",
                ),
                (
                    events_pb2_grpc.add_EventsServiceServicer_to_server,
                    EventsService(
                        bus=rt.bus,
                        hub=hub,
                        heartbeat_seconds=s.stream_heartbeat_seconds,
                        streams_per_user=s.event_streams_per_user,
                        authenticator=authenticator,
                    ),
                    "agentmesh.v1.EventsService",
                ),
            ],
            authenticator,
            [messages.sweep],
        )
    raise ValueError(f"unknown service {name!r}")


def build_server(name: str, rt: Runtime, health: HealthService) -> ServiceServer:
    entries, authenticator, background = _servicers(name, rt)
    for _, servicer, full in entries:
        service = full.rsplit(".", 1)[-1]
        if service.endswith("InternalService"):
            rt.local_servicers[service] = servicer

    def register(server: grpc.aio.Server) -> None:
        for add, servicer, _ in entries:
            add(servicer, server)
        health_pb2_grpc.add_HealthServiceServicer_to_server(health, server)

    s = rt.settings
    return ServiceServer(
        name,
        host=s.host,
        port=s.service_ports[name],
        # A port picked for the server is never the public or admin port, which Envoy binds
        # only later (the kernel soon hands out a port just released, e.g. one a test chose).
        avoid={s.public_port, s.admin_port} - {0},
        interceptors=default_interceptors(authenticator, rt.metrics, rt.quotas, rt.tracing),
        registrations=[register],
        background=background,
        services=[full for _, _, full in entries] + ["agentmesh.v1.HealthService"],
    )


def ensure_port_free(host: str, port: int, what: str) -> None:
    """Fails with a clear message when the port is taken (port 0 is always fine)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"{what} port {port} on {host} is already in use; "
                    f"stop whatever holds it or choose another port"
                ) from None
            raise


class Mesh:
    """The running embedded mesh; ``async with`` starts it and shuts it down in order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.servers: dict[str, ServiceServer] = {}
        self.envoy: EnvoyProcess | None = None
        self.scrape: ScrapeServer | None = None
        self._rt: Runtime | None = None
        self._health: HealthService | None = None

    @property
    def runtime(self) -> Runtime:
        """What the services share (started meshes only)."""
        if self._rt is None:
            raise RuntimeError("the mesh is not started")
        return self._rt

    @property
    def run_dir(self) -> Path:
        return self.settings.data_dir / "run"

    async def start(self) -> None:
        s = self.settings
        ensure_port_free(s.host, s.public_port, "AGENTMESH_PORT: the public")
        self._rt = rt = await Runtime.open(s)
        # Bind every server first: the health service and API-key checks need their addresses.
        peers = rt.peers
        self._health = HealthService(
            db=rt.db, version=s.version, peers=peers, redis_url=s.redis_url
        )
        for name in SERVICES:
            self.servers[name] = build_server(name, rt, self._health)
        for name, server in self.servers.items():
            await server.start()
            peers[name] = server.address
        rt.follow_token_cutoffs()
        self.scrape = rt.scrape_server()
        if self.scrape is not None:
            await self.scrape.start()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        edge = EdgeConfig(
            host=s.host,
            public_port=s.public_port,
            admin_port=s.admin_port,
            service_ports={n: srv.port for n, srv in self.servers.items()},
            jwks_file=s.data_dir / "jwks.json",
            issuer=s.jwt_issuer,
            audience=s.jwt_audience,
            rate_per_connection=s.edge_rate_limit,
        )
        self.envoy = EnvoyProcess(
            config=edge.write(self.run_dir / "envoy.yaml"),
            run_dir=self.run_dir,
            log_file=s.data_dir / "logs" / "envoy.log",
        )
        try:
            await self.envoy.start()
        except EnvoyFailed as exc:
            if "Address already in use" in str(exc) or "cannot bind" in str(exc):
                raise PortInUse(
                    f"AGENTMESH_PORT: the public port {s.public_port} on {s.host} is already in use"
                ) from None
            raise
        self._write_state()
        # Everything made so far (modules, mappings, descriptors, servers) lives as long as
        # the process: kept out of the collector's view, a full collection scans only what
        # calls create, and its pauses, which every stream and call waits out, stay short.
        gc.collect()
        gc.freeze()

    def _write_state(self) -> None:
        s = self.settings
        state = {
            "pid": os.getpid(),
            "public_url": f"http://{s.host}:{s.public_port}",
            "envoy_admin": self.envoy.admin_address if self.envoy else "",
            "services": {n: srv.address for n, srv in self.servers.items()},
            "metrics": self.scrape.address if self.scrape else "",
            "database_url": _redact(s.database_url),
            "data_dir": str(s.data_dir),
        }
        (self.run_dir / "mesh.json").write_text(json.dumps(state, indent=2))

    def banner(self) -> str:
        s = self.settings
        lines = [
            f"agentmesh {s.version} is up",
            f"  REST + gRPC   http://{s.host}:{s.public_port}   (through Envoy)",
        ]
        lines += [f"  {n:<13} {srv.address}   (gRPC, direct)" for n, srv in self.servers.items()]
        if self.scrape is not None:
            lines.append(f"  metrics       http://{self.scrape.address}/metrics   (this process)")
        lines += [
            f"  envoy admin   {self.envoy.admin_address if self.envoy else '-'}",
            f"  database      {_redact(s.database_url)}",
            f"  data dir      {s.data_dir}",
            f"Try: curl -s http://{s.host}:{s.public_port}/health   Stop: Ctrl-C",
        ]
        return "\n".join(lines)

    async def stop(self) -> None:
        """Drain: health NOT_SERVING, in-flight calls finish within the grace period, then
        Envoy stops and the database closes. Safe to call twice."""
        grace = self.settings.grace_seconds
        if self._rt is not None:
            # Streams end first, in-band, so that draining does not wait the grace period out.
            self._rt.stopping()
            await asyncio.sleep(0)
        if self.envoy is not None:
            # No new call reaches a server that is stopping: Envoy stops taking requests, and
            # the ones in flight through it finish first (within the grace period).
            await self.envoy.drain(grace)
        await asyncio.gather(*(srv.drain() for srv in self.servers.values()))
        await asyncio.gather(*(srv.stop(grace) for srv in self.servers.values()))
        if self.scrape is not None:
            await self.scrape.stop()
        if self.envoy is not None:
            await self.envoy.stop()
        if self._health is not None:
            await self._health.close()
        if self._rt is not None:
            await self._rt.close()
        with contextlib.suppress(OSError):
            (self.run_dir / "mesh.json").unlink()

    async def __aenter__(self) -> Mesh:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _redact(url: str) -> str:
    """A database URL without its password, for logs and banners."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


async def run_up(settings: Settings) -> int:
    """Runs the embedded mesh until SIGINT/SIGTERM, or until Envoy keeps crashing."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Mesh(settings) as mesh:
            print(mesh.banner(), flush=True)
            assert mesh.envoy is not None
            envoy_failed = asyncio.create_task(mesh.envoy.failed.wait())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({envoy_failed, stopping}, return_when=asyncio.FIRST_COMPLETED)
            code = 1 if envoy_failed.done() else 0
            envoy_failed.cancel()
            stopping.cancel()
            print(
                "agentmesh: stopping"
                if code == 0
                else "agentmesh: Envoy keeps crashing; "
                f"see {settings.data_dir / 'logs' / 'envoy.log'}",
                file=sys.stderr,
                flush=True,
            )
        print("agentmesh: stopped", file=sys.stderr, flush=True)
        return code
    except PortInUse as exc:
        print(f"agentmesh: {exc}", file=sys.stderr)
        return 2
    except EnvoyFailed as exc:
        print(f"agentmesh: Envoy did not start: {exc}", file=sys.stderr)
        return 1
