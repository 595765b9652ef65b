"""The `agentmesh` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from .common import logs
from .common.config import Settings


def _up(args: argparse.Namespace) -> int:
    from .mesh import run_up

    settings = _settings(
        {
            "AGENTMESH_PORT": args.port,
            "AGENTMESH_DATA_DIR": args.data_dir,
            "DATABASE_URL": args.database_url,
            "REDIS_URL": args.redis_url,
        }
    )
    return asyncio.run(run_up(settings))


def _settings(overrides: dict[str, object]) -> Settings:
    """The environment, with the flags given on top (flags win; both end up in the one
    Settings object), and the logs set up at its level."""
    import os

    env = {**os.environ, **{k: str(v) for k, v in overrides.items() if v is not None}}
    settings = Settings.from_env(env)
    logs.setup(settings.log_level)
    return settings


def _serve(args: argparse.Namespace) -> int:
    from .replica import run_serve

    settings = _settings(
        {
            f"AGENTMESH_{args.service.upper()}_PORT": args.port,
            "AGENTMESH_METRICS_PORT": args.metrics_port,
        }
    )
    return asyncio.run(run_serve(settings, args.service))


def _gateway(args: argparse.Namespace) -> int:
    from .replica import run_gateway

    return asyncio.run(run_gateway(_settings({"AGENTMESH_PORT": args.port})))


def _envoy_config(args: argparse.Namespace) -> int:
    """Renders envoy.yaml with placeholder ports and validates it with the real Envoy."""
    import tempfile

    from gateway.proxy import EdgeConfig, validate

    from .auth.keys import SigningKey
    from .common.config import SERVICES

    with tempfile.TemporaryDirectory() as tmp:
        # jwt_authn refuses an empty key set, so validate against a throwaway key.
        jwks = Path(tmp) / "jwks.json"
        SigningKey.load_or_create(Path(tmp)).write_jwks(jwks)
        cfg = EdgeConfig(
            host="127.0.0.1",
            public_port=8080,
            admin_port=0,
            service_ports={name: 50051 + i for i, name in enumerate(SERVICES)},
            jwks_file=jwks,
            issuer="agentmesh",
            audience="agentmesh",
        )
        path = cfg.write(Path(tmp) / "envoy.yaml")
        if not args.validate:
            sys.stdout.write(path.read_text())
            return 0
        result = validate(path)
        output = (result.stdout + result.stderr).strip()
        print(output or f"envoy --mode validate exited with {result.returncode}")
        return result.returncode


def _grant_role(args: argparse.Namespace) -> int:
    """Gives an existing account a role, straight in the database (works while the mesh runs)."""
    from .auth.admin import grant_role
    from .auth.invalidations import announce, broadcast
    from .common.bus import open_bus
    from .common.db import Database
    from .common.errors import AgentmeshError
    from .mesh import MIGRATIONS

    settings = Settings.from_env()

    async def run() -> int:
        async with Database(settings.database_url) as db:
            for service, folder in MIGRATIONS.items():
                if folder is not None:
                    await db.migrate(service, folder)
            try:
                user = await grant_role(db, args.login, args.role)
            except AgentmeshError as exc:
                print(f"agentmesh: {exc.message}", file=sys.stderr)
                return 1
        if settings.redis_url:
            # The running auth replicas forget the account now, not when their cache runs out.
            bus = open_bus(settings.redis_url, prefix=settings.bus_prefix)
            try:
                if not await announce(broadcast(bus, None), [user.id]):
                    print(
                        "agentmesh: could not tell the auth replicas over Redis; the change"
                        f" reaches their API-key checks within {settings.auth_cache_seconds} s",
                        file=sys.stderr,
                    )
            finally:
                await bus.close()
        print(
            f"{user.username}: roles {', '.join(user.roles)} (effective at the next sign-in "
            "or token refresh)"
        )
        return 0

    return asyncio.run(run())


def _agent_run(args: argparse.Namespace) -> int:
    """Runs the reference agent with the built-in handlers until SIGTERM or Ctrl-C."""
    import logging
    import os
    import socket

    # Only from the environment: a command-line flag would show the key in `ps`.
    key = os.environ.get("AGENTMESH_API_KEY", "").strip()
    if not key:
        print(
            "agentmesh: set AGENTMESH_API_KEY to an API key of the `agent` scope "
            "(see docs/agents.md)",
            file=sys.stderr,
        )
        return 2
    from .agent.handlers import builtin_handlers
    from .agent.runtime import Agent, AgentRefused

    workdir = Path(args.workdir)
    if not workdir.is_dir():
        print(f"agentmesh: --workdir {args.workdir}: not a directory", file=sys.stderr)
        return 2
    handlers = builtin_handlers(workdir)
    wanted = list(dict.fromkeys(args.capability or handlers))
    unknown = [c for c in wanted if c not in handlers]
    if unknown:
        print(
            f"agentmesh: no built-in handler for {', '.join(unknown)}; "
            f"the reference agent handles {', '.join(handlers)}",
            file=sys.stderr,
        )
        return 2
    level = os.environ.get("AGENTMESH_LOG_LEVEL", "INFO").upper()
    logs.setup(level if isinstance(logging.getLevelName(level), int) else "INFO")
    try:
        agent = Agent(
            name=args.name or f"{socket.gethostname()[:48]}-{os.getpid()}",
            api_key=key,
            capabilities=wanted,
            capacity=args.capacity,
            target=args.target or os.environ.get("AGENTMESH_AGENT_TARGET") or "127.0.0.1:8080",
        )
    except ValueError as exc:
        print(f"agentmesh: {exc}", file=sys.stderr)
        return 2
    for capability in wanted:
        agent.add_handler(capability, handlers[capability])
    try:
        asyncio.run(agent.run())
    except AgentRefused as exc:
        print(f"agentmesh: the mesh refused the agent: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser(
        "up",
        help="run the embedded mesh: all services in one process, Envoy as a child",
        description="Configuration comes from flags, else the environment: AGENTMESH_PORT (8080), "
        "AGENTMESH_DATA_DIR (./.agentmesh), DATABASE_URL, REDIS_URL; see README.md.",
    )
    up.add_argument("--port", type=int, help="public port of Envoy (AGENTMESH_PORT, 8080)")
    up.add_argument("--data-dir", help="data directory (AGENTMESH_DATA_DIR, ./.agentmesh)")
    up.add_argument("--database-url", help="SQLAlchemy URL (DATABASE_URL, SQLite in data dir)")
    up.add_argument("--redis-url", help="Redis URL (REDIS_URL, none: in-process)")
    up.set_defaults(run=_up)
    serve = sub.add_parser(
        "serve",
        help="run one service, a replica behind `agentmesh gateway` (PostgreSQL and Redis)",
        description="Needs DATABASE_URL (PostgreSQL), REDIS_URL, the data directory the other "
        "processes share, and AGENTMESH_<SERVICE>_UPSTREAMS of the services it calls. "
        "See README.md, Replicas.",
    )
    serve.add_argument("service", choices=["auth", "tasks", "agents", "messaging"])
    serve.add_argument("--port", type=int, help="its gRPC port (AGENTMESH_<SERVICE>_PORT)")
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="its own Prometheus port, GET /metrics (AGENTMESH_METRICS_PORT, none)",
    )
    serve.set_defaults(run=_serve)
    gateway = sub.add_parser(
        "gateway",
        help="run Envoy in front of replicas (AGENTMESH_<SERVICE>_UPSTREAMS)",
        description="The REST and gRPC edge of `agentmesh up`, for services run with "
        "`agentmesh serve`. See README.md, Replicas.",
    )
    gateway.add_argument("--port", type=int, help="public port (AGENTMESH_PORT, 8080)")
    gateway.set_defaults(run=_gateway)
    grant = sub.add_parser(
        "grant-role",
        help="give an existing account a role, e.g. the first admin",
        description="Uses AGENTMESH_DATA_DIR / DATABASE_URL like `up`.",
    )
    grant.add_argument("login", help="username or email")
    grant.add_argument("role", choices=["admin", "developer", "user", "viewer"])
    grant.set_defaults(run=_grant_role)
    env = sub.add_parser("envoy-config", help="print the rendered envoy.yaml, or validate it")
    env.add_argument("--validate", action="store_true", help="run envoy --mode validate on it")
    env.set_defaults(run=_envoy_config)
    agent = sub.add_parser("agent", help="agent workers")
    agent_sub = agent.add_subparsers(dest="agent_command", required=True)
    agent_run = agent_sub.add_parser(
        "run",
        help="run the reference agent (built-in task types echo, sleep, code_review)",
        description="Connects to the mesh with the API key in AGENTMESH_API_KEY (an `agent`-scoped "
        "key; never a flag, so it stays out of `ps`) and works until SIGTERM or Ctrl-C. "
        "See docs/agents.md.",
    )
    agent_run.add_argument(
        "--capability",
        action="append",
        metavar="TYPE",
        help="a task type to take, repeatable: echo, sleep, code_review (default: all)",
    )
    agent_run.add_argument(
        "--name", metavar="NAME", help="agent name, unique per owner (default: HOSTNAME-PID)"
    )
    agent_run.add_argument(
        "--capacity", type=int, default=1, metavar="N", help="tasks at once (default 1)"
    )
    agent_run.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="host:port of the mesh, Envoy (AGENTMESH_AGENT_TARGET, 127.0.0.1:8080)",
    )
    agent_run.add_argument(
        "--workdir",
        default=".",
        metavar="DIR",
        help="the only directory code_review reads (default: .)",
    )
    agent_run.set_defaults(run=_agent_run)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
