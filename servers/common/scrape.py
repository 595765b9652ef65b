"""A process's own Prometheus endpoint: ``GET /metrics`` on ``AGENTMESH_METRICS_PORT``.

``GET /metrics`` through Envoy reaches one tasks server, and describes that process only. With
`agentmesh up` that is the whole mesh; with replicas, the calls served by the auth, agents and
messaging processes (and by the other tasks replicas) could not be scraped at all. Each process
may therefore answer the same text on a port of its own, which Prometheus scrapes as one target
per process, as it would any service's pods.

The port takes what ``GET /metrics`` takes and nothing else: the same credentials and policy (a
viewer or an admin; an API key with the `read` scope), the same `monitoring` quota, the same
error envelope. It speaks plain HTTP/1.1, one request per connection, GET (or HEAD) only, with
bounded request heads and read times and a cap on open connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

from . import policy
from .auth import Authenticator
from .errors import HTTP_STATUS, AgentmeshError, InternalError, NotFound, ValidationError
from .metrics import CONTENT_TYPE
from .quotas import QuotaExceeded, Quotas
from .server import PortInUse

log = logging.getLogger("agentmesh.metrics")

# The RPC whose policy and quota the port applies: GET /metrics through Envoy.
METHOD = "/agentmesh.v1.MetricsService/GetPrometheusMetrics"
HEAD_MAX = 16 * 1024  # request line and headers
READ_SECONDS = 10.0  # to send them
WRITE_SECONDS = 30.0  # to take the answer
CONNECTIONS_MAX = 32

Render = Callable[[], Awaitable[bytes]]


class _Refused(Exception):
    """A request that gets no answer: the connection just closes."""


def _envelope(error: AgentmeshError, request_id: str) -> bytes:
    # To the second, as every other envelope (Envoy's and the edge's).
    at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "error": {
            "code": error.reason,
            "message": error.message,
            "details": error.details,
            "timestamp": at,
            "request_id": request_id,
        }
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """(method, path, headers by lowercase name) of a request head; ValidationError when it
    is not HTTP/1.x."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValidationError("not an HTTP/1.1 request")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValidationError("a malformed header line")
        headers[name.lower()] = value.strip()
    return method, target.split("?", 1)[0], headers


class ScrapeServer:
    """Serves ``render()`` at GET /metrics to callers ``authenticator`` and the policy allow."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        authenticator: Authenticator,
        quotas: Quotas,
        render: Render,
        avoid: frozenset[int] = frozenset(),
    ) -> None:
        """``avoid``: ports a free port picked here must not be (ones Envoy binds later)."""
        self._host = host
        self._port = port
        self._authenticator = authenticator
        self._quotas = quotas
        self._render = render
        self._avoid = avoid
        self._server: asyncio.Server | None = None
        self._open = 0
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    async def start(self) -> None:
        for _ in range(10):
            try:
                server = await asyncio.start_server(
                    self._connection, self._host, self._port, limit=HEAD_MAX
                )
            except OSError as exc:
                raise PortInUse(
                    f"AGENTMESH_METRICS_PORT: port {self._port} on {self._host} cannot be used"
                    f" ({exc.strerror})"
                ) from None
            picked = server.sockets[0].getsockname()[1]
            if self._port or picked not in self._avoid:
                self._server, self._port = server, picked
                return
            server.close()  # the kernel handed out a port Envoy is about to bind
            await server.wait_closed()
        raise PortInUse("AGENTMESH_METRICS_PORT: no free port found")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for handler in list(self._handlers):
                handler.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._open += 1
        try:
            if self._open <= CONNECTIONS_MAX:
                await self._exchange(reader, writer)
        except (_Refused, ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._handlers.discard(task)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_id = str(uuid.uuid4())
        try:
            async with asyncio.timeout(READ_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            error: AgentmeshError = ValidationError(
                f"the request head is larger than {HEAD_MAX} bytes"
            )
            await self._answer(
                writer,
                HTTP_STATUS[error.status],
                _envelope(error, request_id),
                [("content-type", "application/json"), ("x-request-id", request_id)],
            )
            return
        except (asyncio.IncompleteReadError, TimeoutError):
            raise _Refused from None
        status, body, headers = 200, b"", [("content-type", CONTENT_TYPE)]
        method = "GET"
        try:
            method, path, request = _parse_head(head)
            if path != "/metrics" or method not in ("GET", "HEAD"):
                raise NotFound(f"no route for {method} {path[:200]}")
            if request.get("content-length", "0") != "0" or "transfer-encoding" in request:
                raise ValidationError("GET /metrics takes no body")
            metadata: Mapping[str, str] = {
                name: request[name] for name in ("authorization", "x-api-key") if name in request
            }
            who = await self._authenticator.authorize(METHOD, metadata)
            quota = policy.rule_for(METHOD).quota
            if who is not None and quota:
                headers += await self._quotas.charge(quota, who)
            body = await self._render()
        except QuotaExceeded as exc:
            status, body = 429, _envelope(exc, request_id)
            headers = [("content-type", "application/json"), *exc.headers]
            headers.append(("retry-after", exc.details.get("retry_after", "1")))
        except AgentmeshError as exc:
            status, body = HTTP_STATUS.get(exc.status, 500), _envelope(exc, request_id)
            headers = [("content-type", "application/json")]
        except Exception:
            log.exception("the metrics port failed", extra={"request_id": request_id})
            error = InternalError("internal error", details={"request_id": request_id})
            status, body = 500, _envelope(error, request_id)
            headers = [("content-type", "application/json")]
        headers.append(("x-request-id", request_id))
        await self._answer(writer, status, body, headers, head_only=method == "HEAD")

    @staticmethod
    async def _answer(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        headers: list[tuple[str, str]] | None = None,
        *,
        head_only: bool = False,
    ) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
        for name, value in headers or [("content-type", "application/json")]:
            lines.append(f"{name}: {value}")
        lines += [f"content-length: {len(body)}", "connection: close", "", ""]
        writer.write("\r\n".join(lines).encode("latin-1"))
        if not head_only:
            writer.write(body)
        async with asyncio.timeout(WRITE_SECONDS):
            await writer.drain()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
