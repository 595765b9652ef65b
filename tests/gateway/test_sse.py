"""The SSE arrangement of DESIGN.md through the real envoy.yaml: a server stream of
google.api.HttpBody reaches the client byte for byte, so the server writes its own `id:`,
`event:` and `: keepalive` lines, and the browser's Last-Event-ID arrives as gRPC metadata.

The streaming servicer here is a stand-in (the events service is another issue's); Envoy, its
configuration and the transcoding are the real ones.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import jwt
import pytest
from google.api import httpbody_pb2

from agentmesh.v1 import events_pb2, events_pb2_grpc
from gateway.proxy import EdgeConfig, EnvoyProcess
from servers.auth.keys import SigningKey
from servers.common.config import SERVICES
from servers.launcher import free_port


class Stream(events_pb2_grpc.EventsServiceServicer):
    async def StreamEvents(
        self, request: events_pb2.StreamEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        resume = dict(context.invocation_metadata() or ()).get("last-event-id", "none")
        chunks = [
            "retry: 1000\n\n",
            f": resumed after {resume}\n\n",
            f'id: 7\nevent: task.created\ndata: {{"patterns": "{",".join(request.patterns)}"}}\n\n',
            ": keepalive\n\n",
        ]
        for chunk in chunks:
            yield httpbody_pb2.HttpBody(content_type="text/event-stream", data=chunk.encode())


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    server = grpc.aio.server()
    events_pb2_grpc.add_EventsServiceServicer_to_server(Stream(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    key = SigningKey.load_or_create(tmp_path)
    key.write_jwks(tmp_path / "jwks.json")
    ports = {name: free_port() for name in SERVICES} | {"messaging": port}
    cfg = EdgeConfig(
        host="127.0.0.1",
        public_port=free_port(),
        admin_port=0,
        service_ports=ports,
        jwks_file=tmp_path / "jwks.json",
        issuer="agentmesh",
        audience="agentmesh",
    )
    envoy = EnvoyProcess(
        config=cfg.write(tmp_path / "envoy.yaml"), run_dir=tmp_path, log_file=tmp_path / "e.log"
    )
    await envoy.start()
    now = int(time.time())
    token = jwt.encode(
        {
            "sub": "u",
            "iss": "agentmesh",
            "aud": "agentmesh",
            "iat": now,
            "exp": now + 60,
            "jti": "j",
            "typ": "access",
        },
        key.private_key,
        algorithm="ES256",
        headers={"kid": key.kid},
    )
    try:
        yield f"http://127.0.0.1:{cfg.public_port}", token
    finally:
        await envoy.stop()
        await server.stop(None)


async def test_sse_lines_pass_through_untouched(edge: tuple[str, str]) -> None:
    url, token = edge
    headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": "6"}
    async with httpx.AsyncClient(base_url=url) as client:
        async with client.stream(
            "GET", "/api/v1/events/stream", params={"patterns": "task.*"}, headers=headers
        ) as reply:
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            body = (await reply.aread()).decode()
    assert body == (
        "retry: 1000\n\n"
        ": resumed after 6\n\n"
        'id: 7\nevent: task.created\ndata: {"patterns": "task.*"}\n\n'
        ": keepalive\n\n"
    )
