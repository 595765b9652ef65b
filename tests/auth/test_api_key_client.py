"""ApiKeyClient: how a server checks API keys when the auth service runs in another process
(AuthInternalService.VerifyApiKey over gRPC). `agentmesh up` hosts the auth service in the same
process and checks keys in place (mesh.Runtime.api_keys_here), so the end-to-end tests never
take this path: these tests hold it to the same answers, against a real auth server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from agentmesh.v1 import auth_pb2, auth_pb2_grpc
from servers.auth.admin import grant_role
from servers.common.auth import ApiKeyClient
from servers.common.config import Settings
from servers.common.db import Database
from servers.common.errors import AuthRequired, Unavailable
from servers.common.health import HealthService
from servers.mesh import Runtime, build_server


@dataclass
class AuthServer:
    address: str
    internal_token: str
    stub: auth_pb2_grpc.AuthServiceStub
    db: Database


@pytest.fixture
async def auth_server(tmp_path: Path) -> AsyncIterator[AuthServer]:
    settings = Settings.from_env({"AGENTMESH_DATA_DIR": str(tmp_path)})
    rt = await Runtime.open(settings)
    health = HealthService(db=rt.db, version="test", peers=rt.peers, redis_url=None)
    server = build_server("auth", rt, health)
    try:
        await server.start()
        rt.peers["auth"] = server.address
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield AuthServer(
                server.address, rt.internal_token, auth_pb2_grpc.AuthServiceStub(channel), rt.db
            )
    finally:
        await server.stop(grace=0)
        await rt.close()


async def _agent_key(auth: AuthServer) -> tuple[str, str, str, tuple[tuple[str, str]]]:
    """A new developer's agent key: (user id, key id, secret, the user's bearer metadata)."""
    account = {"email": "keys@example.com", "password": "correct-horse-1"}
    await auth.stub.Register(auth_pb2.RegisterRequest(**account))
    await grant_role(auth.db, account["email"], "developer")
    tokens = await auth.stub.Login(auth_pb2.LoginRequest(**account))
    bearer = (("authorization", f"Bearer {tokens.access_token}"),)
    me = await auth.stub.GetMe(auth_pb2.GetMeRequest(), metadata=bearer)
    created = await auth.stub.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(name="worker", scopes=["agent"]), metadata=bearer
    )
    return me.user.id, created.api_key.key_id, created.key, bearer


async def test_a_key_resolves_to_its_owner_and_stops_at_once_when_revoked(
    auth_server: AuthServer,
) -> None:
    user_id, key_id, secret, bearer = await _agent_key(auth_server)
    client = ApiKeyClient(
        address=lambda: auth_server.address, internal_token=auth_server.internal_token
    )
    try:
        who = await client(secret)
        assert (who.subject, who.kind, who.token_id) == (user_id, "api_key", key_id)
        assert who.scopes == ("agent",) and who.roles and who.permissions

        with pytest.raises(AuthRequired):
            await client("amk_" + "x" * 40)

        await auth_server.stub.RevokeApiKey(
            auth_pb2.RevokeApiKeyRequest(key_id=key_id), metadata=bearer
        )
        with pytest.raises(AuthRequired):
            await client(secret)
    finally:
        await client.close()


async def test_a_client_the_auth_service_does_not_trust_cannot_verify(
    auth_server: AuthServer,
) -> None:
    _, _, secret, _ = await _agent_key(auth_server)
    client = ApiKeyClient(address=lambda: auth_server.address, internal_token="not-the-token")
    try:
        # Refused as an outsider (PERMISSION_DENIED): not a verdict on the key, so a 503-class
        # error for the caller rather than a 401.
        with pytest.raises(Unavailable):
            await client(secret)
    finally:
        await client.close()
