"""API keys end to end: created with a session, used as `Bearer amk_...` or `X-API-Key`, narrowed
by their scopes, revoked or expired at once, and never a way to sign in or manage accounts.

REST goes through Envoy; gRPC goes straight to the servers and through Envoy. The tasks and agents
servers are separate gRPC servers: a key working there proves they ask the auth service.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import httpx
import pytest

from agentmesh.v1 import (
    agents_pb2,
    agents_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)
from servers.launcher import MeshProcess
from tests.helpers import assert_envelope, error_reason, grant_role, new_user

Grant = Callable[[str, str], None]


@pytest.fixture
def grant(mesh: MeshProcess) -> Grant:
    """Grants a role on the SQLite `mesh`."""
    return lambda login, role: grant_role(mesh, login, role, None)


@pytest.fixture
def any_grant(request: pytest.FixtureRequest, any_mesh: MeshProcess, mesh: MeshProcess) -> Grant:
    """Grants a role on `any_mesh`, whichever database it runs on."""
    url = None if any_mesh is mesh else str(request.getfixturevalue("postgres_url"))
    return lambda login, role: grant_role(any_mesh, login, role, url)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _metadata(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def _register(client: httpx.Client) -> tuple[dict[str, str], dict[str, object]]:
    user = new_user()
    reply = client.post("/api/v1/auth/register", json=user)
    assert reply.status_code == 201, reply.text
    return user, reply.json()


def _login(client: httpx.Client, user: dict[str, str]) -> str:
    reply = client.post(
        "/api/v1/auth/login", json={"username": user["username"], "password": user["password"]}
    )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["access_token"])


def _token(client: httpx.Client) -> tuple[dict[str, str], str, str]:
    """A fresh plain user: its credentials, access token and user id."""
    user, body = _register(client)
    profile = body["user"]
    assert isinstance(profile, dict)
    return user, str(body["access_token"]), str(profile["id"])


def _developer(client: httpx.Client, grant: Grant) -> tuple[dict[str, str], str]:
    """A fresh user with the developer role, signed in again so that its token says so."""
    user, _, _ = _token(client)
    grant(user["username"], "developer")
    return user, _login(client, user)


def _create(client: httpx.Client, token: str, scopes: list[str], **extra: str) -> httpx.Response:
    body: dict[str, object] = {"name": "test key", "scopes": scopes, **extra}
    return client.post("/api/v1/auth/api-keys", json=body, headers=_auth(token))


def _key(client: httpx.Client, token: str, scopes: list[str], **extra: str) -> tuple[str, str]:
    """A new key's secret and id."""
    reply = _create(client, token, scopes, **extra)
    assert reply.status_code == 201, reply.text
    return str(reply.json()["key"]), str(reply.json()["api_key"]["key_id"])


def _rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_create_list_and_use_a_key(any_mesh: MeshProcess) -> None:
    with httpx.Client(base_url=any_mesh.url) as client:
        user, token, user_id = _token(client)
        created = _create(client, token, ["read"], name="ci bot")
        assert created.status_code == 201, created.text
        body = created.json()
        secret = body["key"]
        record = body["api_key"]
        assert secret.startswith("amk_") and len(secret) > 40
        assert record["key_id"]
        assert record["name"] == "ci bot"
        assert record["prefix"] == secret[:12] and record["prefix"].startswith("amk_")
        assert record["scopes"] == ["read"]
        made = _when(record["created_at"])
        assert abs((datetime.now(UTC) - made).total_seconds()) < 60
        assert "revoked_at" not in record or not record["revoked_at"]

        # The key signs requests for its owner, in either header.
        for headers in (_auth(secret), {"X-API-Key": secret}):
            me = client.get("/api/v1/auth/me", headers=headers)
            assert me.status_code == 200, me.text
            assert me.json()["user"]["id"] == user_id
            assert me.json()["user"]["username"] == user["username"]
            valid = client.get("/api/v1/auth/validate", headers=headers)
            assert valid.status_code == 200, valid.text
            assert valid.json()["valid"] is True
            assert valid.json()["user"]["id"] == user_id

        # The list shows the key, that it was used, and never the secret.
        listed = client.get("/api/v1/auth/api-keys", headers=_auth(token))
        assert listed.status_code == 200, listed.text
        page = listed.json()
        assert page["total"] == 1 and page["limit"] == 50 and page["offset"] == 0
        assert page["has_more"] is False
        (item,) = page["api_keys"]
        assert item["key_id"] == record["key_id"]
        assert item["prefix"] == record["prefix"]
        assert item["last_used_at"]
        assert secret not in listed.text
        assert secret[12:] not in listed.text


def test_key_list_is_paged_and_only_the_callers(mesh: MeshProcess) -> None:
    with httpx.Client(base_url=mesh.url) as client:
        _, token, _ = _token(client)
        _, other, _ = _token(client)
        ids = [_key(client, token, ["read"])[1] for _ in range(3)]
        _key(client, other, ["read"])

        first = client.get("/api/v1/auth/api-keys", params={"limit": 2}, headers=_auth(token))
        assert first.status_code == 200, first.text
        assert first.json()["total"] == 3 and first.json()["has_more"] is True
        assert len(first.json()["api_keys"]) == 2
        rest = client.get(
            "/api/v1/auth/api-keys", params={"limit": 2, "offset": 2}, headers=_auth(token)
        )
        assert rest.status_code == 200, rest.text
        assert rest.json()["limit"] == 2 and rest.json()["offset"] == 2
        assert rest.json()["has_more"] is False
        seen = [k["key_id"] for k in first.json()["api_keys"] + rest.json()["api_keys"]]
        assert sorted(seen) == sorted(ids)

        too_many = client.get("/api/v1/auth/api-keys", params={"limit": 101}, headers=_auth(token))
        assert_envelope(too_many, 400, "VALIDATION_ERROR")


def test_revoked_key_fails_on_the_next_request(any_mesh: MeshProcess) -> None:
    edge = any_mesh.url.removeprefix("http://")
    with httpx.Client(base_url=any_mesh.url) as client:
        _, token, _ = _token(client)
        secret, key_id = _key(client, token, ["read"])
        assert client.get("/api/v1/auth/me", headers=_auth(secret)).status_code == 200

        revoked = client.delete(f"/api/v1/auth/api-keys/{key_id}", headers=_auth(token))
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["api_key"]["key_id"] == key_id
        assert _when(revoked.json()["api_key"]["revoked_at"]) <= datetime.now(UTC)

        for headers in (_auth(secret), {"X-API-Key": secret}):
            assert_envelope(client.get("/api/v1/auth/me", headers=headers), 401, "AUTH_REQUIRED")
        listed = client.get("/api/v1/auth/api-keys", headers=_auth(token)).json()
        assert listed["api_keys"][0]["revoked_at"]

    for address in (any_mesh.services["auth"], edge):
        stub = auth_pb2_grpc.AuthServiceStub(grpc.insecure_channel(address))
        with pytest.raises(grpc.RpcError) as err:
            stub.GetMe(auth_pb2.GetMeRequest(), metadata=_metadata(secret), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, address
        assert error_reason(err.value) == "AUTH_REQUIRED", address


def test_someone_elses_key_cannot_be_revoked(mesh: MeshProcess) -> None:
    with httpx.Client(base_url=mesh.url) as client:
        _, owner, _ = _token(client)
        _, stranger, _ = _token(client)
        secret, key_id = _key(client, owner, ["read"])

        theft = client.delete(f"/api/v1/auth/api-keys/{key_id}", headers=_auth(stranger))
        assert_envelope(theft, 404, "NOT_FOUND")
        unknown = client.delete(
            "/api/v1/auth/api-keys/00000000-0000-0000-0000-000000000000", headers=_auth(owner)
        )
        assert_envelope(unknown, 404, "NOT_FOUND")
        # The stranger does not see it either, and the key still works.
        theirs = client.get("/api/v1/auth/api-keys", headers=_auth(stranger)).json()
        assert theirs["total"] == 0 and theirs["api_keys"] == []
        assert client.get("/api/v1/auth/me", headers=_auth(secret)).status_code == 200


def test_expired_key_fails(any_mesh: MeshProcess) -> None:
    with httpx.Client(base_url=any_mesh.url) as client:
        _, token, _ = _token(client)
        expires = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
        created = _create(client, token, ["read"], expires_at=_rfc3339(expires))
        assert created.status_code == 201, created.text
        assert _when(created.json()["api_key"]["expires_at"]) == expires
        secret = created.json()["key"]
        assert client.get("/api/v1/auth/me", headers=_auth(secret)).status_code == 200

        time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.5)
        assert_envelope(client.get("/api/v1/auth/me", headers=_auth(secret)), 401, "AUTH_REQUIRED")
        assert_envelope(
            client.get("/api/v1/auth/validate", headers={"X-API-Key": secret}), 401, "AUTH_REQUIRED"
        )


def test_bad_key_requests_are_validation_errors(mesh: MeshProcess) -> None:
    past = _rfc3339(datetime.now(UTC) - timedelta(minutes=1))
    too_late = _rfc3339(datetime.now(UTC) + timedelta(days=3660))
    cases: list[tuple[str, dict[str, object]]] = [
        ("name", {"name": "", "scopes": ["read"]}),
        ("name", {"name": "   ", "scopes": ["read"]}),
        ("name", {"name": "n" * 65, "scopes": ["read"]}),
        ("scopes", {"name": "k", "scopes": []}),
        ("scopes", {"name": "k"}),
        ("scopes", {"name": "k", "scopes": ["root"]}),
        ("scopes", {"name": "k", "scopes": ["read", "root"]}),
        ("expires_at", {"name": "k", "scopes": ["read"], "expires_at": past}),
        ("expires_at", {"name": "k", "scopes": ["read"], "expires_at": too_late}),
    ]
    with httpx.Client(base_url=mesh.url) as client:
        _, token, _ = _token(client)
        for field, body in cases:
            reply = client.post("/api/v1/auth/api-keys", json=body, headers=_auth(token))
            error = assert_envelope(reply, 400, "VALIDATION_ERROR")
            assert error["details"] == {"field": field}, body
        longest = _create(client, token, ["read"], name="n" * 64)
        assert longest.status_code == 201, longest.text
        # An expiry with an offset is the same instant, answered in UTC.
        offset = _create(client, token, ["read"], expires_at="2030-01-01T00:00:00+02:00")
        assert offset.status_code == 201, offset.text
        assert offset.json()["api_key"]["expires_at"] == "2029-12-31T22:00:00Z"
        # Nothing was created by the refused requests.
        assert client.get("/api/v1/auth/api-keys", headers=_auth(token)).json()["total"] == 2


def test_at_most_100_active_keys(mesh: MeshProcess) -> None:
    with httpx.Client(base_url=mesh.url) as client:
        _, token, _ = _token(client)
        ids = [_key(client, token, ["read"])[1] for _ in range(100)]
        error = assert_envelope(_create(client, token, ["read"]), 400, "VALIDATION_ERROR")
        assert error["details"] == {"limit": "100"}
        # A revoked key no longer counts.
        reply = client.delete(f"/api/v1/auth/api-keys/{ids[0]}", headers=_auth(token))
        assert reply.status_code == 200, reply.text
        assert _create(client, token, ["read"]).status_code == 201
        assert_envelope(_create(client, token, ["read"]), 400, "VALIDATION_ERROR")


def test_a_key_cannot_have_a_scope_its_owner_lacks(mesh: MeshProcess, grant: Grant) -> None:
    with httpx.Client(base_url=mesh.url) as client:
        _, token, _ = _token(client)
        for scopes in (["write"], ["agent"], ["read", "write"]):
            assert_envelope(_create(client, token, scopes), 403, "INSUFFICIENT_PERMISSIONS")
        both = _create(client, token, ["execute", "read"])
        assert both.status_code == 201, both.text
        assert sorted(both.json()["api_key"]["scopes"]) == ["execute", "read"]

        _, developer = _developer(client, grant)
        for scopes in (["agent"], ["write"], ["agent", "read", "write", "execute"]):
            reply = _create(client, developer, scopes)
            assert reply.status_code == 201, reply.text


def test_keys_cannot_sign_in_refresh_or_manage_accounts(mesh: MeshProcess) -> None:
    with httpx.Client(base_url=mesh.url) as client:
        user, token, user_id = _token(client)
        secret, key_id = _key(client, token, ["read", "execute"])

        login = client.post(
            "/api/v1/auth/login", json={"username": user["username"], "password": secret}
        )
        assert_envelope(login, 401, "INVALID_CREDENTIALS")
        as_body = client.post("/api/v1/auth/refresh", json={"refresh_token": secret})
        assert_envelope(as_body, 401, "AUTH_REQUIRED")
        as_header = client.post("/api/v1/auth/refresh", json={}, headers=_auth(secret))
        assert_envelope(as_header, 401, "AUTH_REQUIRED")

        password = {"current_password": user["password"], "new_password": "another-pass-99"}
        for headers in (_auth(secret), {"X-API-Key": secret}):
            refused = [
                client.post(
                    "/api/v1/auth/api-keys", json={"name": "k", "scopes": ["read"]}, headers=headers
                ),
                client.get("/api/v1/auth/api-keys", headers=headers),
                client.delete(f"/api/v1/auth/api-keys/{key_id}", headers=headers),
                client.post("/api/v1/auth/change-password", json=password, headers=headers),
                client.put("/api/v1/auth/me", json={"name": "Renamed"}, headers=headers),
                client.post("/api/v1/auth/logout", json={}, headers=headers),
                client.get("/api/v1/users", headers=headers),
                client.get(f"/api/v1/users/{user_id}", headers=headers),
                client.put(f"/api/v1/users/{user_id}", json={"name": "X"}, headers=headers),
            ]
            for reply in refused:
                assert_envelope(reply, 403, "INSUFFICIENT_PERMISSIONS")

        # None of it happened: the key lives, the password and the name are unchanged.
        assert client.get("/api/v1/auth/me", headers=_auth(secret)).status_code == 200
        assert client.get("/api/v1/auth/api-keys", headers=_auth(token)).json()["total"] == 1
        assert _login(client, user)
        assert (
            client.get("/api/v1/auth/me", headers=_auth(token)).json()["user"]["name"]
            == (user["full_name"])
        )


@pytest.mark.parametrize("path", ["/api/v1/auth/api-keys", "/api/v1/auth/api-keys/any-id"])
def test_key_management_needs_a_signed_in_user(mesh: MeshProcess, path: str) -> None:
    with httpx.Client(base_url=mesh.url) as client:
        reply = client.get(path) if path.endswith("api-keys") else client.delete(path)
    assert_envelope(reply, 401, "AUTH_REQUIRED")


def test_scopes_narrow_a_key_over_rest(mesh: MeshProcess) -> None:
    task = {"type": "echo", "description": "say hi"}
    with httpx.Client(base_url=mesh.url) as client:
        _, token, _ = _token(client)
        read_only, _ = _key(client, token, ["read"])
        execute, _ = _key(client, token, ["execute"])

        for headers in (_auth(read_only), {"X-API-Key": read_only}):
            reply = client.post("/api/v1/tasks", json=task, headers=headers)
            assert_envelope(reply, 403, "INSUFFICIENT_PERMISSIONS")
        owner = client.get("/api/v1/auth/me", headers=_auth(token)).json()["user"]["id"]
        for headers in (_auth(execute), {"X-API-Key": execute}, _auth(token)):
            reply = client.post("/api/v1/tasks", json=task, headers=headers)
            assert reply.status_code == 201, reply.text
            # The task is the key owner's.
            assert reply.json()["owner_id"] == owner


@pytest.mark.parametrize("where", ["direct", "envoy"])
def test_scopes_narrow_a_key_over_grpc(mesh: MeshProcess, where: str) -> None:
    """The tasks server is its own gRPC server: it asks the auth service about the key."""
    address = mesh.services["tasks"] if where == "direct" else mesh.url.removeprefix("http://")
    with httpx.Client(base_url=mesh.url) as client:
        _, token, _ = _token(client)
        read_only, _ = _key(client, token, ["read"])
        execute, revoked_id = _key(client, token, ["execute"])

    stub = tasks_pb2_grpc.TasksServiceStub(grpc.insecure_channel(address))
    request = tasks_pb2.CreateTaskRequest(type="echo", description="say hi")
    for metadata in (_metadata(read_only), (("x-api-key", read_only),)):
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateTask(request, metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(err.value) == "INSUFFICIENT_PERMISSIONS"
    for metadata in (_metadata(execute), (("x-api-key", execute),)):
        created = stub.CreateTask(request, metadata=metadata, timeout=10)
        assert created.status == "queued" and created.owner_id

    # Revoked in the auth service, refused by the tasks server on the next call.
    with httpx.Client(base_url=mesh.url) as client:
        reply = client.delete(f"/api/v1/auth/api-keys/{revoked_id}", headers=_auth(token))
        assert reply.status_code == 200, reply.text
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateTask(request, metadata=_metadata(execute), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(err.value) == "AUTH_REQUIRED"


def test_agent_key_passes_the_agent_rule(mesh: MeshProcess, grant: Grant) -> None:
    body = {"name": "worker-1", "capabilities": ["echo"]}
    with httpx.Client(base_url=mesh.url) as client:
        _, developer = _developer(client, grant)
        agent, _ = _key(client, developer, ["agent"])
        plain, _ = _key(client, developer, ["read", "write", "execute"])

        for headers in (_auth(agent), {"X-API-Key": agent}):
            reply = client.post("/api/v1/agents/register", json=body, headers=headers)
            assert reply.status_code in (200, 201), reply.text
        # The developer's own session and a key without the agent scope are not agents.
        for headers in (_auth(developer), _auth(plain)):
            reply = client.post("/api/v1/agents/register", json=body, headers=headers)
            assert_envelope(reply, 403, "INSUFFICIENT_PERMISSIONS")

    # Straight to the agents server too.
    stub = agents_pb2_grpc.AgentsServiceStub(grpc.insecure_channel(mesh.services["agents"]))
    request = agents_pb2.RegisterAgentRequest(name="worker-1", capabilities=["echo"])
    registered = stub.RegisterAgent(request, metadata=_metadata(agent), timeout=10)
    assert registered.agent.name == "worker-1"
    with pytest.raises(grpc.RpcError) as err:
        stub.RegisterAgent(request, metadata=_metadata(developer), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(err.value) == "INSUFFICIENT_PERMISSIONS"


def test_disabling_the_owner_stops_its_keys(any_mesh: MeshProcess, any_grant: Grant) -> None:
    with httpx.Client(base_url=any_mesh.url) as client:
        admin, _, _ = _token(client)
        any_grant(admin["username"], "admin")
        admin_token = _login(client, admin)
        _, token, user_id = _token(client)
        secret, _ = _key(client, token, ["read", "execute"])
        assert client.get("/api/v1/auth/me", headers=_auth(secret)).status_code == 200

        off = client.put(
            f"/api/v1/users/{user_id}", json={"disabled": True}, headers=_auth(admin_token)
        )
        assert off.status_code == 200, off.text
        assert off.json()["disabled"] is True
        for headers in (_auth(secret), {"X-API-Key": secret}):
            assert_envelope(client.get("/api/v1/auth/me", headers=headers), 401, "AUTH_REQUIRED")
        task = client.post(
            "/api/v1/tasks", json={"description": "x"}, headers={"X-API-Key": secret}
        )
        assert_envelope(task, 401, "AUTH_REQUIRED")

    stub = tasks_pb2_grpc.TasksServiceStub(grpc.insecure_channel(any_mesh.services["tasks"]))
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateTask(
            tasks_pb2.CreateTaskRequest(description="x"), metadata=_metadata(secret), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(err.value) == "AUTH_REQUIRED"


def test_a_key_follows_its_owners_current_roles(mesh: MeshProcess, grant: Grant) -> None:
    """A key acts with its owner's roles of the moment, not those it was created with."""
    task = {"type": "echo", "description": "x"}
    with httpx.Client(base_url=mesh.url) as client:
        admin, _, _ = _token(client)
        grant(admin["username"], "admin")
        admin_token = _login(client, admin)
        _, token, user_id = _token(client)
        execute, _ = _key(client, token, ["execute", "read"])
        first = client.post("/api/v1/tasks", json=task, headers=_auth(execute))
        assert first.status_code == 201, first.text

        demoted = client.put(
            f"/api/v1/users/{user_id}/roles", json={"roles": ["viewer"]}, headers=_auth(admin_token)
        )
        assert demoted.status_code == 200, demoted.text
        # A viewer may not run tasks: neither may its execute key, from the next request on.
        assert_envelope(
            client.post("/api/v1/tasks", json=task, headers=_auth(execute)),
            403,
            "INSUFFICIENT_PERMISSIONS",
        )
        # Reading is still within both the viewer role and the key's scopes.
        listed = client.get("/api/v1/tasks", headers=_auth(execute))
        assert listed.status_code == 200 and listed.json()["total"] == 1


def test_agent_key_stops_when_its_owner_loses_the_developer_role(
    mesh: MeshProcess, grant: Grant
) -> None:
    """The `agent` scope needs write on agents to be created; losing it ends the agent key."""
    body = {"name": "worker-1", "capabilities": ["echo"]}
    with httpx.Client(base_url=mesh.url) as client:
        admin, _, _ = _token(client)
        grant(admin["username"], "admin")
        admin_token = _login(client, admin)
        developer, developer_token = _developer(client, grant)
        me = client.get("/api/v1/auth/me", headers=_auth(developer_token)).json()["user"]
        agent, _ = _key(client, developer_token, ["agent"])
        reply = client.post("/api/v1/agents/register", json=body, headers=_auth(agent))
        assert reply.status_code in (200, 201), reply.text

        demoted = client.put(
            f"/api/v1/users/{me['id']}/roles", json={"roles": ["user"]}, headers=_auth(admin_token)
        )
        assert demoted.status_code == 200, demoted.text
        # A plain user could not create this key now; the key must not outlive the role.
        assert_envelope(
            _create(client, _login(client, developer), ["agent"]), 403, "INSUFFICIENT_PERMISSIONS"
        )
        reply = client.post("/api/v1/agents/register", json=body, headers=_auth(agent))
        assert_envelope(reply, 403, "INSUFFICIENT_PERMISSIONS")


@pytest.mark.parametrize("where", ["direct", "envoy"])
def test_keys_over_grpc(mesh: MeshProcess, where: str) -> None:
    address = mesh.services["auth"] if where == "direct" else mesh.url.removeprefix("http://")
    stub = auth_pb2_grpc.AuthServiceStub(grpc.insecure_channel(address))
    user = new_user()
    tokens = stub.Register(
        auth_pb2.RegisterRequest(
            username=user["username"], email=user["email"], password=user["password"]
        ),
        timeout=10,
    )
    session = _metadata(tokens.access_token)
    created = stub.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(name="grpc key", scopes=["read"]), metadata=session, timeout=10
    )
    assert created.key.startswith("amk_")
    assert created.api_key.prefix == created.key[:12]
    assert list(created.api_key.scopes) == ["read"]
    assert not created.api_key.HasField("revoked_at")

    for metadata in (_metadata(created.key), (("x-api-key", created.key),)):
        me = stub.GetMe(auth_pb2.GetMeRequest(), metadata=metadata, timeout=10)
        assert me.user.id == tokens.user.id

    listed = stub.ListApiKeys(auth_pb2.ListApiKeysRequest(), metadata=session, timeout=10)
    assert [k.key_id for k in listed.api_keys] == [created.api_key.key_id]
    assert listed.total == 1 and listed.limit == 50 and not listed.has_more
    assert created.key not in str(listed)

    with pytest.raises(grpc.RpcError) as err:
        stub.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(name="from a key", scopes=["read"]),
            metadata=_metadata(created.key),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(err.value) == "INSUFFICIENT_PERMISSIONS"

    with pytest.raises(grpc.RpcError) as err:
        stub.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(name="too much", scopes=["write"]),
            metadata=session,
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(err.value) == "INSUFFICIENT_PERMISSIONS"

    revoked = stub.RevokeApiKey(
        auth_pb2.RevokeApiKeyRequest(key_id=created.api_key.key_id), metadata=session, timeout=10
    )
    assert revoked.api_key.HasField("revoked_at")
    with pytest.raises(grpc.RpcError) as err:
        stub.GetMe(auth_pb2.GetMeRequest(), metadata=_metadata(created.key), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(err.value) == "AUTH_REQUIRED"
