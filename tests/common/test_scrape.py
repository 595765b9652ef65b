"""A process's own metrics port (servers/common/scrape.py) on a real socket: what GET /metrics
through Envoy takes, it takes (credentials, policy, quota, envelope), and nothing else."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from servers.auth.keys import SigningKey
from servers.common import errors, scrape
from servers.common.auth import Authenticator, TokenVerifier
from servers.common.context import Principal
from servers.common.metrics import CONTENT_TYPE
from servers.common.quotas import DEFAULTS, Quota, Quotas
from servers.common.scrape import ScrapeServer
from tests.attacks import sign

ISSUER = AUDIENCE = "agentmesh"
TEXT = b"# TYPE up gauge\nup 1\n"


async def _no_keys(secret: str) -> Principal:
    raise errors.AuthRequired("invalid API key")


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return SigningKey.load_or_create(tmp_path)


async def _started(key: SigningKey, quotas: Quotas | None = None) -> ScrapeServer:
    async def render() -> bytes:
        return TEXT

    server = ScrapeServer(
        host="127.0.0.1",
        port=0,
        authenticator=Authenticator(
            verifier=TokenVerifier(jwks=key.jwks, issuer=ISSUER, audience=AUDIENCE),
            internal_token="internal-secret",
            api_keys=_no_keys,
        ),
        quotas=quotas or Quotas(DEFAULTS),
        render=render,
    )
    await server.start()
    return server


@pytest.fixture
async def port(key: SigningKey) -> AsyncIterator[str]:
    server = await _started(key)
    yield f"http://{server.address}"
    await server.stop()


def _bearer(key: SigningKey, *roles: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {sign(key.private_key, key.kid, roles=list(roles))}"}


def _error(reply: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code, error
    assert error["request_id"] == reply.headers["x-request-id"]
    return dict(error)


async def test_a_viewer_scrapes_the_process_metrics(port: str, key: SigningKey) -> None:
    async with httpx.AsyncClient(base_url=port) as client:
        reply = await client.get("/metrics", headers=_bearer(key, "viewer"))
        assert reply.status_code == 200, reply.text
        assert reply.content == TEXT
        assert reply.headers["content-type"] == CONTENT_TYPE
        # The monitoring quota's headers, as through Envoy.
        assert reply.headers["x-ratelimit-limit"] == "500"
        assert reply.headers["x-ratelimit-remaining"] == "499"
        head = await client.head("/metrics", headers=_bearer(key, "admin"))
        assert head.status_code == 200 and head.content == b""


async def test_the_policy_of_get_metrics_applies(port: str, key: SigningKey) -> None:
    async with httpx.AsyncClient(base_url=port) as client:
        _error(await client.get("/metrics"), 401, "AUTH_REQUIRED")
        _error(await client.get("/metrics", headers={"X-API-Key": "amk_x"}), 401, "AUTH_REQUIRED")
        forged = {"Authorization": "Bearer " + sign(key.private_key, "other-kid")}
        _error(await client.get("/metrics", headers=forged), 401, "AUTH_REQUIRED")
        for roles in (("user",), ("developer", "user")):
            reply = await client.get("/metrics", headers=_bearer(key, *roles))
            _error(reply, 403, "INSUFFICIENT_PERMISSIONS")


async def test_only_get_metrics_is_served(port: str, key: SigningKey) -> None:
    viewer = _bearer(key, "viewer")
    async with httpx.AsyncClient(base_url=port) as client:
        for path in ("/", "/metrics/", "/api/v1/metrics", "/health"):
            _error(await client.get(path, headers=viewer), 404, "NOT_FOUND")
        _error(await client.post("/metrics", headers=viewer), 404, "NOT_FOUND")
        reply = await client.request("GET", "/metrics", headers=viewer, content=b"x" * 10)
        _error(reply, 400, "VALIDATION_ERROR")
        # A query string is not a different path.
        assert (await client.get("/metrics?x=1", headers=viewer)).status_code == 200


async def test_the_monitoring_quota_is_counted(key: SigningKey) -> None:
    server = await _started(key, Quotas({**DEFAULTS, "monitoring": Quota(2, 3600)}))
    try:
        async with httpx.AsyncClient(base_url=f"http://{server.address}") as client:
            viewer = _bearer(key, "viewer")
            for _ in range(2):
                assert (await client.get("/metrics", headers=viewer)).status_code == 200
            refused = await client.get("/metrics", headers=viewer)
            error = _error(refused, 429, "RATE_LIMIT_EXCEEDED")
            assert error["details"]["quota"] == "monitoring"
            assert int(refused.headers["retry-after"]) > 0
            assert refused.headers["x-ratelimit-remaining"] == "0"
    finally:
        await server.stop()


def _raw(address: str, data: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_malformed_and_oversized_requests_are_refused(port: str) -> None:
    address = port.removeprefix("http://")
    answer = await asyncio.to_thread(_raw, address, b"GARBAGE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"VALIDATION_ERROR" in answer
    big = b"GET /metrics HTTP/1.1\r\nx-pad: " + b"a" * scrape.HEAD_MAX + b"\r\n\r\n"
    answer = await asyncio.to_thread(_raw, address, big)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"larger than" in answer
    assert b"\r\nx-request-id: " in answer


async def _closed_unanswered(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 2) == b""
    except ConnectionResetError:  # closed with the request unread
        return True


async def test_slow_and_surplus_connections_are_closed(
    key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scrape, "READ_SECONDS", 0.2)
    monkeypatch.setattr(scrape, "CONNECTIONS_MAX", 1)
    server = await _started(key)
    host, port = server.address.rsplit(":", 1)
    try:
        # One connection that never sends its head holds the only place...
        idle_reader, idle_writer = await asyncio.open_connection(host, int(port))
        await asyncio.sleep(0.05)
        # ...so another is closed unanswered,
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert await _closed_unanswered(reader)
        writer.close()
        # and the idle one is closed after READ_SECONDS, unanswered.
        assert await _closed_unanswered(idle_reader)
        idle_writer.close()
        # Its place is free again.
        async with httpx.AsyncClient(base_url=f"http://{server.address}") as client:
            _error(await client.get("/metrics"), 401, "AUTH_REQUIRED")
    finally:
        await server.stop()
