"""The `agentmesh` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from .common import logs
from .common.config import Settings


def _up(args: argparse.Namespace) -> int:
    import os

    from .mesh import run_up

    # Flags win over the environment; both end up in the one Settings object.
    overrides = {
        "AGENTMESH_PORT": args.port,
        "AGENTMESH_DATA_DIR": args.data_dir,
        "DATABASE_URL": args.database_url,
        "REDIS_URL": args.redis_url,
    }
    env = {**os.environ, **{k: str(v) for k, v in overrides.items() if v is not None}}
    settings = Settings.from_env(env)
    logs.setup(settings.log_level)
    return asyncio.run(run_up(settings))


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
        print(
            f"{user.username}: roles {', '.join(user.roles)} (effective at the next sign-in "
            "or token refresh)"
        )
        return 0

    return asyncio.run(run())


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
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
