"""Configuration, built once from the environment (and CLI flags) and passed explicitly."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .peers import is_ipv4
from .quotas import DEFAULTS as quota_defaults
from .quotas import TIER_DEFAULTS, TIERS, Quota
from .quotas import parse as parse_quotas
from .tracing import wanted as tracing_wanted

SERVICES = ("auth", "tasks", "agents", "messaging")
MAX_RETENTION_DAYS = 36_500


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"agentmesh: {name} must be an integer, got {raw!r}") from None
    if not 0 <= value <= 65535 and name.endswith("PORT"):
        raise SystemExit(f"agentmesh: {name} must be a port number (0-65535), got {value}")
    return value


def _quotas(
    name: str, env: Mapping[str, str], defaults: Mapping[str, Quota], what: str
) -> dict[str, Quota]:
    try:
        return parse_quotas(env.get(name) or "", defaults, what=what)
    except ValueError as exc:
        raise SystemExit(f"agentmesh: {name}: {exc}") from None


def _tier(raw: str) -> str:
    if raw and raw not in TIERS:
        raise SystemExit(f"agentmesh: AGENTMESH_DEFAULT_TIER must be one of {TIERS}")
    return raw


def _non_negative(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 0:
        raise SystemExit(f"agentmesh: {name} must be 0 or more, got {value}")
    return value


def _retention_days(env: Mapping[str, str], name: str, default: int, what: str) -> int:
    days = _non_negative(env, name, default)
    if days > MAX_RETENTION_DAYS:  # a moment before year 1 does not exist
        raise SystemExit(
            f"agentmesh: {name} must be at most {MAX_RETENTION_DAYS} (0 keeps {what} for ever)"
        )
    return days


MAX_UPSTREAMS = 64


HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def _upstreams(env: Mapping[str, str]) -> dict[str, tuple[tuple[str, int], ...]]:
    """AGENTMESH_<SERVICE>_UPSTREAMS: where the replicas of each service listen, as
    comma-separated IPv4:PORT, or one HOST:PORT whose name resolves to them all (a container
    network's service name): gRPC's client balances over a name's addresses, not over several
    names."""
    found: dict[str, tuple[tuple[str, int], ...]] = {}
    for name in SERVICES:
        variable = f"AGENTMESH_{name.upper()}_UPSTREAMS"
        raw = (env.get(variable) or "").strip()
        if not raw:
            continue
        items = [item.strip() for item in raw.split(",") if item.strip()]
        addresses = []
        for item in items:
            host, _, port = item.rpartition(":")
            number = int(port) if port.isdigit() else 0
            if not (is_ipv4(host) or HOSTNAME.match(host)) or not 1 <= number <= 65535:
                raise SystemExit(
                    f"agentmesh: {variable}: {item!r} is not IPv4:PORT or HOST:PORT"
                    " (e.g. 10.0.0.5:7001, tasks:7001)"
                )
            addresses.append((host, number))
        if len(addresses) > MAX_UPSTREAMS:
            raise SystemExit(f"agentmesh: {variable}: at most {MAX_UPSTREAMS} addresses")
        if len(addresses) > 1 and not all(is_ipv4(host) for host, _ in addresses):
            raise SystemExit(
                f"agentmesh: {variable}: several replicas are IPv4 addresses; give one name"
                " that resolves to all of them instead"
            )
        found[name] = tuple(addresses)
    return found


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 1:
        raise SystemExit(f"agentmesh: {name} must be at least 1, got {value}")
    return value


def _between(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    value = _int(env, name, default)
    if not low <= value <= high:
        raise SystemExit(f"agentmesh: {name} must be from {low} to {high}, got {value}")
    return value


# How long one attempt of a task may run, in seconds: the default of a task that does not say
# (AGENTMESH_TASK_TIMEOUT_SECONDS unless set) and the most any task may ask for.
TASK_TIMEOUT_DEFAULT, TASK_TIMEOUT_MAX = 3600, 7 * 24 * 3600


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a process of the mesh needs to know at start.

    Environment variables (all optional):
      AGENTMESH_DATA_DIR     data directory (default ./.agentmesh): SQLite file, signing keys
      AGENTMESH_PORT         Envoy's public listener (default 8080)
      AGENTMESH_HOST         address Envoy and the servers bind (default 127.0.0.1)
      AGENTMESH_ADMIN_PORT   Envoy admin, always on 127.0.0.1 (default 0: any free port)
      AGENTMESH_<SERVICE>_PORT  gRPC port of auth/tasks/agents/messaging (default 0: free port)
      DATABASE_URL           SQLAlchemy URL (default: SQLite in the data directory)
      REDIS_URL              Redis for the bus and limits (default: none, in-process)
      AGENTMESH_BUS_PREFIX   prefix of the mesh's Redis keys: the bus, the quotas and the
                             limits (default "agentmesh:"); processes with the same prefix act
                             as one mesh
      AGENTMESH_GRACE_SECONDS  drain time on shutdown (default 5)
      AGENTMESH_DRAIN_SECONDS  `serve`: how long a stopping replica still serves while it
                             answers health checks NOT_SERVING, so that the gateway sends it
                             no new calls (default 3: the gateway checks every 2 s; 0-60)
      AGENTMESH_LOG_LEVEL    DEBUG, INFO, WARNING (default INFO)
      AGENTMESH_LOGIN_LIMIT  login attempts per client address and per account (default 10)
      AGENTMESH_REGISTER_LIMIT  registrations per client address (default 10)
      AGENTMESH_LOGIN_WINDOW_SECONDS  the window of those limits (default 3600)
      AGENTMESH_LEASE_SECONDS      how long an agent holds a task without renewal (default 30)
      AGENTMESH_TASK_TIMEOUT_SECONDS  how long one attempt of a task that does not say may
                                   run (default 3600, at most 604800)
      AGENTMESH_TASK_RETENTION_DAYS  ended tasks are deleted this many days after they ended
                                   (default 30; 0 keeps them for ever)
      AGENTMESH_HEARTBEAT_SECONDS  how often agents send heartbeats (default 10)
      AGENTMESH_AGENT_RETENTION_DAYS  agents offline this many days are forgotten (default 7;
                                   0 keeps them for ever)
      AGENTMESH_AGENTS_PER_OWNER   agents one user may have registered (default 1000)
      AGENTMESH_OPEN_TASKS_PER_USER  unfinished tasks one user may hold (default 10000)
      AGENTMESH_EVENT_RETENTION_SECONDS  how long events stay replayable (default 86400)
      AGENTMESH_EVENT_RETENTION_MAX      at most this many events are kept (default 100000)
      AGENTMESH_STREAM_HEARTBEAT_SECONDS heartbeats on idle event and inbox streams, and how
                                   often their credential is checked again (default 15)
      AGENTMESH_EVENT_STREAMS_PER_USER  event streams a user may hold open (default 20)
      AGENTMESH_MESSAGE_RATE_LIMIT  messages an agent may send per second (default 50)
      AGENTMESH_INBOX_MAX_UNACKED   unacknowledged messages an inbox holds (default 10000)
      AGENTMESH_QUOTAS              request quotas per principal, CLASS=LIMIT/SECONDS by commas
                                    over the defaults "general=1000/60, monitoring=500/3600,
                                    management=100/3600, agent=6000/60"; CLASS=0: no limit
                                    (servers/common/quotas.py)
      AGENTMESH_TIERS               seed 000's tiers the same way, over "free=100/3600,
                                    pro=1000/3600, enterprise=0"
      AGENTMESH_DEFAULT_TIER        the tier of accounts an admin put in none (default: none;
                                    they have the general quota)
      AGENTMESH_EDGE_RATE_LIMIT     requests per second Envoy takes on one client connection,
                                    its flood guard (default 500); gRPC multiplexes a client's
                                    calls on one connection, so raise it for busy services
      AGENTMESH_CALLBACK_ALLOW_PRIVATE  1: task callbacks may call private and loopback
                                        addresses (default: refused)
      AGENTMESH_CALLBACK_SECRET     the key callbacks are signed with (default: created once in
                                    the data directory)
      AGENTMESH_<SERVICE>_UPSTREAMS  replicas (`agentmesh serve`, `agentmesh gateway`): where
                                    that service's processes listen, IPv4:PORT by commas or
                                    one HOST:PORT whose name resolves to them all
      OTEL_EXPORTER_OTLP_ENDPOINT   an OTLP/HTTP collector: traces on (servers/common/tracing.py;
                                    or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; other OTEL_* variables
                                    as the OpenTelemetry SDK reads them)
    """

    data_dir: Path
    host: str = "127.0.0.1"
    public_port: int = 8080
    admin_port: int = 0
    service_ports: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(SERVICES, 0))
    database_url: str = ""
    redis_url: str | None = None
    bus_prefix: str = "agentmesh:"
    grace_seconds: float = 5.0
    drain_seconds: int = 3
    log_level: str = "INFO"
    jwt_issuer: str = "agentmesh"
    jwt_audience: str = "agentmesh"
    access_token_ttl: int = 3600
    login_limit: int = 10
    register_limit: int = 10
    login_window: int = 3600
    lease_seconds: int = 30
    task_timeout_seconds: int = TASK_TIMEOUT_DEFAULT
    task_retention_days: int = 30
    agent_retention_days: int = 7
    agents_per_owner: int = 1000
    open_tasks_per_user: int = 10_000
    heartbeat_seconds: int = 10
    claim_poll_seconds: int = 2
    auth_cache_seconds: int = 2
    # How often a process asks the auth service which accounts' older tokens are refused.
    token_cutoff_poll_seconds: int = 5
    # The process's own Prometheus port (servers/common/scrape.py); None: none, 0: a free one.
    metrics_port: int | None = None
    event_retention_seconds: int = 86400
    event_retention_max: int = 100_000
    stream_heartbeat_seconds: int = 15
    event_streams_per_user: int = 20
    message_rate_limit: int = 50
    inbox_max_unacked: int = 10_000
    edge_rate_limit: int = 500
    quotas: Mapping[str, Quota] = field(default_factory=lambda: dict(quota_defaults))
    tiers: Mapping[str, Quota] = field(default_factory=lambda: dict(TIER_DEFAULTS))
    default_tier: str = ""
    callback_allow_private: bool = False
    tracing: bool = False  # an OTLP collector is configured
    # Where other processes serve each service (`agentmesh serve`, `agentmesh gateway`).
    upstreams: Mapping[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)
    version: str = "0.1.0"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        data_dir = Path(env.get("AGENTMESH_DATA_DIR") or ".agentmesh").resolve()
        ports = {name: _int(env, f"AGENTMESH_{name.upper()}_PORT", 0) for name in SERVICES}
        return cls(
            data_dir=data_dir,
            host=env.get("AGENTMESH_HOST") or "127.0.0.1",
            public_port=_int(env, "AGENTMESH_PORT", 8080),
            admin_port=_int(env, "AGENTMESH_ADMIN_PORT", 0),
            service_ports=ports,
            database_url=env.get("DATABASE_URL") or default_database_url(data_dir),
            redis_url=env.get("REDIS_URL") or None,
            bus_prefix=env.get("AGENTMESH_BUS_PREFIX") or "agentmesh:",
            grace_seconds=float(env.get("AGENTMESH_GRACE_SECONDS") or 5.0),
            drain_seconds=_between(env, "AGENTMESH_DRAIN_SECONDS", 3, 0, 60),
            log_level=(env.get("AGENTMESH_LOG_LEVEL") or "INFO").upper(),
            login_limit=_int(env, "AGENTMESH_LOGIN_LIMIT", 10),
            register_limit=_int(env, "AGENTMESH_REGISTER_LIMIT", 10),
            login_window=_int(env, "AGENTMESH_LOGIN_WINDOW_SECONDS", 3600),
            lease_seconds=_int(env, "AGENTMESH_LEASE_SECONDS", 30),
            task_timeout_seconds=_between(
                env, "AGENTMESH_TASK_TIMEOUT_SECONDS", TASK_TIMEOUT_DEFAULT, 1, TASK_TIMEOUT_MAX
            ),
            task_retention_days=_retention_days(env, "AGENTMESH_TASK_RETENTION_DAYS", 30, "tasks"),
            agent_retention_days=_retention_days(
                env, "AGENTMESH_AGENT_RETENTION_DAYS", 7, "agents"
            ),
            agents_per_owner=_positive(env, "AGENTMESH_AGENTS_PER_OWNER", 1000),
            open_tasks_per_user=_positive(env, "AGENTMESH_OPEN_TASKS_PER_USER", 10_000),
            heartbeat_seconds=_int(env, "AGENTMESH_HEARTBEAT_SECONDS", 10),
            claim_poll_seconds=_positive(env, "AGENTMESH_CLAIM_POLL_SECONDS", 2),
            auth_cache_seconds=_between(env, "AGENTMESH_AUTH_CACHE_SECONDS", 2, 0, 300),
            token_cutoff_poll_seconds=_between(
                env, "AGENTMESH_TOKEN_CUTOFF_POLL_SECONDS", 5, 1, 300
            ),
            metrics_port=(
                _int(env, "AGENTMESH_METRICS_PORT", 0)
                if env.get("AGENTMESH_METRICS_PORT")
                else None
            ),
            event_retention_seconds=_positive(env, "AGENTMESH_EVENT_RETENTION_SECONDS", 86400),
            event_retention_max=_positive(env, "AGENTMESH_EVENT_RETENTION_MAX", 100_000),
            stream_heartbeat_seconds=_positive(env, "AGENTMESH_STREAM_HEARTBEAT_SECONDS", 15),
            event_streams_per_user=_positive(env, "AGENTMESH_EVENT_STREAMS_PER_USER", 20),
            message_rate_limit=_positive(env, "AGENTMESH_MESSAGE_RATE_LIMIT", 50),
            inbox_max_unacked=_positive(env, "AGENTMESH_INBOX_MAX_UNACKED", 10_000),
            edge_rate_limit=_positive(env, "AGENTMESH_EDGE_RATE_LIMIT", 500),
            quotas=_quotas("AGENTMESH_QUOTAS", env, quota_defaults, "CLASS"),
            tiers=_quotas("AGENTMESH_TIERS", env, TIER_DEFAULTS, "TIER"),
            default_tier=_tier(env.get("AGENTMESH_DEFAULT_TIER") or ""),
            callback_allow_private=env.get("AGENTMESH_CALLBACK_ALLOW_PRIVATE") == "1",
            tracing=tracing_wanted(env),
            upstreams=_upstreams(env),
        )

    def with_ports(self, **ports: int) -> Settings:
        """A copy with some service ports fixed (after binding port 0)."""
        return replace(self, service_ports={**self.service_ports, **ports})


def default_database_url(data_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{data_dir / 'agentmesh.db'}"
