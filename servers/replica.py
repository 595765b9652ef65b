"""Replicas (DESIGN.md, Operations): `agentmesh serve SERVICE` runs one service in a process,
`agentmesh gateway` runs Envoy in front of the replicas of all four.

Every process of one mesh shares:

- the database, on PostgreSQL (DATABASE_URL): replicas take rows with FOR UPDATE SKIP LOCKED
  and migrate under a lock;
- Redis (REDIS_URL): the event bus, the message hub, the agents replicas' signals, the quotas
  and the login limits, which the in-process defaults would keep per process;
- the data directory's keys (AGENTMESH_DATA_DIR/keys, or AGENTMESH_INTERNAL_TOKEN and
  AGENTMESH_CALLBACK_SECRET): the auth replicas sign tokens with its signing key, and every
  process checks them against it;
- where each service listens: AGENTMESH_<SERVICE>_UPSTREAMS (IPv4:PORT by commas, or one
  HOST:PORT whose name resolves to them all). Envoy balances the replicas and checks their
  grpc.health.v1; a service calls another over gRPC, round robin over its replicas.

An agents replica holds only the streams of the agents connected to it; what it is asked to tell
an agent held by another replica goes over Redis (servers/agents/signals.py).
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys

from gateway.proxy import EdgeConfig, EnvoyFailed, EnvoyProcess

from .common.config import SERVICES, Settings
from .common.health import HealthService
from .common.peers import peer_target
from .common.scrape import ScrapeServer
from .common.server import PortInUse
from .mesh import Runtime, build_server

# The services each one calls: the auth service for API keys, and its partners.
CALLS = {
    "auth": (),
    "tasks": ("auth", "agents"),
    "agents": ("auth", "tasks"),
    "messaging": ("auth", "agents"),
}


def _shared(settings: Settings) -> str:
    """Why these settings cannot run replicas, or ""."""
    if not settings.database_url.startswith("postgresql"):
        return "replicas share a PostgreSQL database: set DATABASE_URL=postgresql+asyncpg://..."
    if not settings.redis_url:
        return "replicas share Redis (events, messages, quotas): set REDIS_URL=redis://..."
    return ""


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _refuse(command: str, why: str) -> int:
    print(f"agentmesh {command}: {why}", file=sys.stderr)
    return 2


async def run_serve(settings: Settings, service: str) -> int:
    """Runs one service until SIGINT/SIGTERM, then drains it as `agentmesh up` does."""
    if why := _shared(settings):
        return _refuse("serve", why)
    missing = [name for name in CALLS[service] if name not in settings.upstreams]
    if missing:
        variables = ", ".join(f"AGENTMESH_{name.upper()}_UPSTREAMS" for name in missing)
        return _refuse(
            "serve", f"the {service} service calls {', '.join(missing)}: set {variables}"
        )
    stop = _stop_on_signals()
    rt = await Runtime.open(settings)
    health: HealthService | None = None
    scrape: ScrapeServer | None = None
    try:
        for name, addresses in settings.upstreams.items():
            if name != service:
                rt.peers[name] = peer_target(addresses)
        health = HealthService(
            db=rt.db, version=settings.version, peers=rt.peers, redis_url=settings.redis_url
        )
        server = build_server(service, rt, health)
        try:
            await server.start()
        except PortInUse as exc:
            return _refuse("serve", str(exc))
        rt.peers[service] = server.address
        rt.follow_token_cutoffs()
        scrape = rt.scrape_server()
        if scrape is not None:
            try:
                await scrape.start()
            except PortInUse as exc:
                await server.stop(0)
                return _refuse("serve", str(exc))
            print(f"agentmesh serve {service}: metrics on http://{scrape.address}/metrics")
        print(f"agentmesh serve {service}: listening on {server.address}", flush=True)
        gc.collect()
        gc.freeze()  # as `agentmesh up` does: see Mesh.start
        await stop.wait()
        print(f"agentmesh serve {service}: stopping", file=sys.stderr, flush=True)
        # Health NOT_SERVING first, while calls are still served: the gateway's next health
        # check takes the replica out of its rotation. Only then do streams end (their
        # clients reconnect to the other replicas) and the server stop taking calls. Stopped
        # at once, the calls Envoy still sent here were cancelled or refused.
        await server.drain()
        await asyncio.sleep(settings.drain_seconds)
        rt.stopping()
        await asyncio.sleep(0)
        await server.stop(settings.grace_seconds)
    finally:
        if scrape is not None:
            await scrape.stop()
        if health is not None:
            await health.close()
        await rt.close()
    print(f"agentmesh serve {service}: stopped", file=sys.stderr, flush=True)
    return 0


async def run_gateway(settings: Settings) -> int:
    """Runs Envoy in front of the replicas until SIGINT/SIGTERM, or until it keeps crashing."""
    missing = [name for name in SERVICES if name not in settings.upstreams]
    if missing:
        variables = ", ".join(f"AGENTMESH_{name.upper()}_UPSTREAMS" for name in missing)
        return _refuse("gateway", f"where do the services listen? set {variables}")
    jwks = settings.data_dir / "jwks.json"
    if not jwks.exists():
        return _refuse(
            "gateway",
            f"{jwks} is missing: it is written by `agentmesh serve` at start, in the data "
            "directory the replicas share; start them first",
        )
    run_dir = settings.data_dir / "gateway"
    edge = EdgeConfig(
        host=settings.host,
        public_port=settings.public_port,
        admin_port=settings.admin_port,
        service_ports=dict.fromkeys(SERVICES, 0),
        upstreams=settings.upstreams,
        jwks_file=jwks,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        rate_per_connection=settings.edge_rate_limit,
    )
    envoy = EnvoyProcess(
        config=edge.write(run_dir / "envoy.yaml"),
        run_dir=run_dir,
        log_file=settings.data_dir / "logs" / "gateway-envoy.log",
    )
    stop = _stop_on_signals()
    try:
        await envoy.start()
    except EnvoyFailed as exc:
        return _refuse("gateway", f"Envoy did not start: {exc}")
    try:
        print(
            f"agentmesh gateway: http://{settings.host}:{settings.public_port} "
            f"(envoy admin {envoy.admin_address})",
            flush=True,
        )
        failed = asyncio.create_task(envoy.failed.wait())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({failed, stopping}, return_when=asyncio.FIRST_COMPLETED)
        code = 1 if failed.done() else 0
        failed.cancel()
        stopping.cancel()
    finally:
        await envoy.stop()
    print("agentmesh gateway: stopped", file=sys.stderr, flush=True)
    return code
