"""GET /api/v1/auth/me several ways, against two baselines measured in the same run.

  rest_health_live   GET /health/live through Envoy: the same path with no credential to check
                     (the REST baseline)
  rest_me_jwt        GET /api/v1/auth/me with an access token through Envoy (jwt_authn, then the
                     auth server verifies it again and reads the profile)
  rest_me_api_key    the same with an API key (no jwt_authn; the auth server looks the key up)
  grpc_direct        AuthService.GetMe over gRPC straight to the auth server
  grpc_echo_ceiling  a bare grpc.aio server in its own process, echoing a GetMe-sized payload:
                     what grpc.aio does here when the handler does no work (the gRPC baseline)

One client process drives every case with the same closed loop: N asyncio workers, each sending
its next request as soon as its last one is answered, so that the ratios compare like with like.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
import httpx

from agentmesh.v1 import auth_pb2, auth_pb2_grpc
from servers.common.server import SERVER_OPTIONS
from servers.launcher import MeshProcess

NAME = "auth_me"
# Two baselines: the unauthenticated REST call on the same path (what checking a credential
# costs through Envoy) and a bare grpc.aio echo (the ceiling of this runtime on this machine).
BASELINE = "rest_health_live (REST), grpc_echo_ceiling (gRPC)"
# Throughput ratios to print, numerator over denominator.
RATIOS = (
    ("rest_me_jwt", "rest_health_live"),
    ("rest_me_api_key", "rest_health_live"),
    ("rest_me_jwt", "grpc_echo_ceiling"),
    ("grpc_direct", "grpc_echo_ceiling"),
    ("rest_me_jwt", "grpc_direct"),
)

CALL_TIMEOUT = 10.0
WARMUP_TIMEOUT = 60.0
# Safety bounds: a phase never sends more than this, and gives up after this many failures.
MAX_REQUESTS = 1_000_000
MAX_ERRORS = 100
ECHO_SERVICE, ECHO_METHOD = "bench.Echo", "Echo"
# A proxy from the environment must not carry benchmark traffic anywhere else.
CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)
# Pinned so that a caller's environment cannot move the mesh off loopback or off SQLite.
MESH_ENV = {
    "AGENTMESH_HOST": "127.0.0.1",
    "DATABASE_URL": "",
    "REDIS_URL": "",
    # One access line per request would be part of what is measured.
    "AGENTMESH_LOG_LEVEL": "WARNING",
    # One caller makes every request: quotas high enough never to refuse one, still counted
    # (their cost is part of each call's).
    "AGENTMESH_QUOTAS": "general=100000000/60,agent=100000000/60",
}


@dataclass(frozen=True, kw_only=True)
class Settings:
    seconds: float
    concurrency: int
    warmup: int
    # The mesh's database in the dispatch benchmark ("sqlite" or "postgres"); the others keep
    # the embedded default.
    database: str = "sqlite"


@dataclass(frozen=True, kw_only=True)
class CaseResult:
    name: str
    requests: int  # successful responses in the measured window
    errors: int  # failed calls and failed checks, warm-up included
    seconds: float
    p50_ms: float | None
    p99_ms: float | None
    first_error: str

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass(frozen=True, kw_only=True)
class Report:
    name: str
    title: str
    baseline: str
    cases: list[CaseResult]
    ratios: tuple[tuple[str, str], ...]
    notes: list[str]


class CheckFailed(Exception):
    """A response arrived, but not the expected one."""


Call = Callable[[], Awaitable[None]]


@dataclass
class _Phase:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    seconds: float = 0.0


async def _drive(call: Call, *, workers: int, max_requests: int, seconds: float) -> _Phase:
    """Closed loop: `workers` tasks call back to back until the time or the count runs out."""
    phase = _Phase()
    sent = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def worker() -> None:
        nonlocal sent
        while sent < max_requests and phase.errors < MAX_ERRORS:
            if time.perf_counter() >= deadline:
                return
            sent += 1
            begun = time.perf_counter()
            try:
                await call()
            except Exception as exc:  # any failure counts; the first one is reported
                phase.errors += 1
                phase.first_error = phase.first_error or f"{type(exc).__name__}: {exc}"[:300]
            else:
                phase.latencies_ms.append((time.perf_counter() - begun) * 1000.0)

    await asyncio.gather(*(worker() for _ in range(workers)))
    # Up to the last answer, so requests still in flight at the deadline are in the rate.
    phase.seconds = time.perf_counter() - started
    return phase


def _percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted values."""
    if not ordered:
        return None
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered)) - 1))]


async def _case(name: str, call: Call, settings: Settings) -> CaseResult:
    warm = await _drive(
        call, workers=settings.concurrency, max_requests=settings.warmup, seconds=WARMUP_TIMEOUT
    )
    run = await _drive(
        call, workers=settings.concurrency, max_requests=MAX_REQUESTS, seconds=settings.seconds
    )
    ordered = sorted(run.latencies_ms)
    return CaseResult(
        name=name,
        requests=len(ordered),
        errors=warm.errors + run.errors,
        seconds=run.seconds,
        p50_ms=_percentile(ordered, 0.50),
        p99_ms=_percentile(ordered, 0.99),
        first_error=warm.first_error or run.first_error,
    )


def _loopback(address: str) -> str:
    host = address.removeprefix("http://").rsplit(":", 1)[0]
    if host != "127.0.0.1":
        raise RuntimeError(f"benchmark traffic stays on 127.0.0.1, not {address}")
    return address


# --- the ceiling: a bare grpc.aio echo server in a child process, as each mesh server is ---


def _serve_echo(conn: Connection) -> None:
    """Child process entry point: serve until the parent says stop (or goes away)."""
    asyncio.run(_echo_main(conn))


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _echo_main(conn: Connection) -> None:
    # No (de)serializers: the bytes pass through untouched. The mesh's transport options keep
    # the comparison to "the same server, without the work".
    handler = grpc.method_handlers_generic_handler(
        ECHO_SERVICE, {ECHO_METHOD: grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send(port)
    try:
        await asyncio.to_thread(_wait_for_stop, conn)
    finally:
        await server.stop(None)


def _wait_for_stop(conn: Connection) -> None:
    with contextlib.suppress(EOFError):
        conn.recv()


@contextlib.contextmanager
def _echo_server(startup_timeout: float = 30.0) -> Iterator[str]:
    """Starts the echo server in a spawned process and yields its address."""
    # spawn, not fork: the child must not inherit this process's gRPC state.
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_serve_echo, args=(theirs,), name="bench-echo", daemon=True)
    proc.start()
    theirs.close()  # so that recv() sees EOF if the child dies
    try:
        try:
            if not ours.poll(startup_timeout):
                raise RuntimeError(f"echo server not ready in {startup_timeout}s")
            port = ours.recv()
        except EOFError:
            raise RuntimeError(f"echo server exited early ({proc.exitcode})") from None
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(OSError):
            ours.send("stop")
        ours.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


# --- the cases ---


async def _register(http: httpx.AsyncClient) -> tuple[str, str]:
    reply = await http.post(
        "/api/v1/auth/register",
        json={"email": "bench@example.com", "password": "bench-pass-123", "username": "bench"},
    )
    if reply.status_code != 201:
        raise RuntimeError(f"register answered {reply.status_code}: {reply.text[:500]}")
    body = reply.json()
    return str(body["access_token"]), str(body["user"]["id"])


async def _run_cases(mesh: MeshProcess, echo_address: str, settings: Settings) -> Report:
    from bench import wrk

    auth_address = _loopback(mesh.services["auth"])
    _loopback(mesh.url)
    _loopback(echo_address)
    # One keep-alive connection per worker; trust_env=False: no proxy from the environment.
    limits = httpx.Limits(
        max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency
    )
    async with (
        httpx.AsyncClient(
            base_url=mesh.url, limits=limits, timeout=CALL_TIMEOUT, trust_env=False
        ) as http,
        grpc.aio.insecure_channel(auth_address, options=CHANNEL_OPTIONS) as auth_channel,
        grpc.aio.insecure_channel(echo_address, options=CHANNEL_OPTIONS) as echo_channel,
    ):
        token, user_id = await _register(http)
        headers = {"Authorization": f"Bearer {token}"}
        created = await http.post(
            "/api/v1/auth/api-keys", json={"name": "bench", "scopes": ["read"]}, headers=headers
        )
        if created.status_code != 201:
            raise RuntimeError(f"api key answered {created.status_code}: {created.text[:300]}")
        key_headers = {"Authorization": f"Bearer {created.json()['key']}"}
        metadata = (("authorization", f"Bearer {token}"),)
        stub = auth_pb2_grpc.AuthServiceStub(auth_channel)
        me = await stub.GetMe(auth_pb2.GetMeRequest(), metadata=metadata, timeout=CALL_TIMEOUT)
        # The echo carries the same bytes as a GetMe reply, and the same token as metadata.
        payload = b"x" * me.ByteSize()
        echo = echo_channel.unary_unary(f"/{ECHO_SERVICE}/{ECHO_METHOD}")

        async def me(with_headers: dict[str, str]) -> None:
            reply = await http.get("/api/v1/auth/me", headers=with_headers)
            if reply.status_code != 200:
                raise CheckFailed(f"HTTP {reply.status_code}: {reply.text[:200]}")
            if reply.json()["user"]["id"] != user_id:
                raise CheckFailed(f"wrong user: {reply.text[:200]}")

        async def rest_health_live() -> None:
            reply = await http.get("/health/live")
            if reply.status_code != 200 or reply.json() != {"status": "alive"}:
                raise CheckFailed(f"HTTP {reply.status_code}: {reply.text[:200]}")

        async def rest_me_jwt() -> None:
            await me(headers)

        async def rest_me_api_key() -> None:
            await me(key_headers)

        async def grpc_direct() -> None:
            reply = await stub.GetMe(
                auth_pb2.GetMeRequest(), metadata=metadata, timeout=CALL_TIMEOUT
            )
            if reply.user.id != user_id:
                raise CheckFailed(f"wrong user: {reply.user.id!r}")

        async def grpc_echo_ceiling() -> None:
            reply = await echo(payload, metadata=metadata, timeout=CALL_TIMEOUT)
            if reply != payload:
                raise CheckFailed(f"echo returned {len(reply)} bytes, sent {len(payload)}")

        if wrk.available():
            # Every response is checked once here; wrk then counts statuses only.
            await rest_health_live()
            await rest_me_jwt()
            await rest_me_api_key()
            rest = await wrk.cases(
                [
                    ("rest_health_live", mesh.url + "/health/live", {}),
                    ("rest_me_jwt", mesh.url + "/api/v1/auth/me", headers),
                    ("rest_me_api_key", mesh.url + "/api/v1/auth/me", key_headers),
                ],
                settings,
            )
            rest_load = (
                "REST load: wrk (native, 1 thread), the cases interleaved in 3 rounds; "
                "gRPC load: the Python client"
            )
        else:
            rest = [
                await _case("rest_health_live", rest_health_live, settings),
                await _case("rest_me_jwt", rest_me_jwt, settings),
                await _case("rest_me_api_key", rest_me_api_key, settings),
            ]
            rest_load = (
                "REST load: the Python client (install Debian's wrk for figures of the mesh "
                "rather than of the client)"
            )
        cases = [
            *rest,
            await _case("grpc_direct", grpc_direct, settings),
            await _case("grpc_echo_ceiling", grpc_echo_ceiling, settings),
        ]
    return Report(
        name=NAME,
        title="GET /api/v1/auth/me (AuthService.GetMe)",
        baseline=BASELINE,
        cases=cases,
        ratios=RATIOS,
        notes=[
            f"GetMe reply and echo payload: {len(payload)} bytes; bearer token: {len(token)} chars",
            "mesh: SQLite, in-process bus; four services in one process, Envoy its child",
            rest_load,
        ],
    )


def run(settings: Settings) -> Report:
    """Boots the mesh and the echo server, measures every case, and stops both."""
    with tempfile.TemporaryDirectory(prefix="agentmesh-bench-") as tmp:
        mesh = MeshProcess(data_dir=Path(tmp), env=MESH_ENV)
        mesh.start()
        try:
            with _echo_server() as echo_address:
                return asyncio.run(_run_cases(mesh, echo_address, settings))
        finally:
            mesh.stop()
