"""Attacks on identity, each through Envoy and straight to a server: forged tokens, refresh
tokens used as access tokens, forged identity headers, a viewer calling a mutation."""

from __future__ import annotations

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agentmesh.v1 import auth_pb2, auth_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from servers.launcher import MeshProcess
from tests.attacks import forged_tokens
from tests.helpers import assert_envelope, error_reason, grant_role, new_user


def _mesh_key(mesh: MeshProcess) -> tuple[ec.EllipticCurvePrivateKey, str]:
    pem = (mesh.data_dir / "keys" / "signing-key.pem").read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    kid = httpx.get(mesh.url + "/.well-known/jwks.json").json()["keys"][0]["kid"]
    return key, kid


def _grpc_me(address: str, metadata: tuple[tuple[str, str], ...]) -> grpc.RpcError:
    stub = auth_pb2_grpc.AuthServiceStub(grpc.insecure_channel(address))
    with pytest.raises(grpc.RpcError) as err:
        stub.GetMe(auth_pb2.GetMeRequest(), metadata=metadata, timeout=10)
    return err.value


def test_forged_tokens_through_envoy(mesh: MeshProcess) -> None:
    for name, (token, reason) in forged_tokens(*_mesh_key(mesh)).items():
        reply = httpx.get(
            mesh.url + "/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"}
        )
        # Envoy's jwt_authn answers first; its codes are the same documented ones.
        assert_envelope(reply, 401, reason), name


def test_forged_tokens_through_envoy_over_grpc(mesh: MeshProcess) -> None:
    """Envoy's refusal of a token reaches a gRPC caller as a server's would: UNAUTHENTICATED
    (a wrong audience too), with the documented reason in its ErrorInfo, so that a client
    tells an expired token, which a refresh mends, from a bad one."""
    tokens = {**forged_tokens(*_mesh_key(mesh)), "no token": ("", "AUTH_REQUIRED")}
    for name, (token, reason) in tokens.items():
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        err = _grpc_me(mesh.url.removeprefix("http://"), metadata)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert error_reason(err) == reason, name


def test_forged_tokens_straight_to_each_server(mesh: MeshProcess) -> None:
    tokens = forged_tokens(*_mesh_key(mesh))
    for name, (token, reason) in tokens.items():
        err = _grpc_me(mesh.services["auth"], (("authorization", f"Bearer {token}"),))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert error_reason(err) == reason, name
        # The tasks server checks tokens on its own too.
        stub = tasks_pb2_grpc.TasksServiceStub(grpc.insecure_channel(mesh.services["tasks"]))
        with pytest.raises(grpc.RpcError) as tasks_err:
            stub.GetTask(
                tasks_pb2.GetTaskRequest(task_id="t"),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )
        assert error_reason(tasks_err.value) == reason, name


def test_refresh_token_is_not_an_access_token(mesh: MeshProcess) -> None:
    refresh = httpx.post(mesh.url + "/api/v1/auth/register", json=new_user()).json()[
        "refresh_token"
    ]
    reply = httpx.get(mesh.url + "/api/v1/auth/me", headers={"Authorization": f"Bearer {refresh}"})
    assert_envelope(reply, 401, "AUTH_REQUIRED")
    err = _grpc_me(mesh.services["auth"], (("authorization", f"Bearer {refresh}"),))
    assert error_reason(err) == "AUTH_REQUIRED"


FORGED_HEADERS = (
    ("x-jwt-sub", "admin"),
    ("x-user-id", "admin"),
    ("x-forwarded-user", "admin"),
    ("x-roles", "admin"),
    ("x-agentmesh-internal", "guess"),
)


def test_forged_identity_headers_are_not_an_identity(mesh: MeshProcess) -> None:
    reply = httpx.get(mesh.url + "/api/v1/auth/me", headers=dict(FORGED_HEADERS))
    assert_envelope(reply, 401, "AUTH_REQUIRED")
    err = _grpc_me(mesh.services["auth"], FORGED_HEADERS)
    assert error_reason(err) == "AUTH_REQUIRED"
    # A guessed internal credential opens no internal RPC.
    internal = auth_pb2_grpc.AuthInternalServiceStub(grpc.insecure_channel(mesh.services["auth"]))
    with pytest.raises(grpc.RpcError) as denied:
        internal.VerifyApiKey(
            auth_pb2.VerifyApiKeyRequest(key="amk_x"), metadata=FORGED_HEADERS, timeout=10
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_client_cannot_choose_its_identity_with_a_valid_token(mesh: MeshProcess) -> None:
    # A real token plus headers claiming to be someone else: the token wins.
    body = httpx.post(mesh.url + "/api/v1/auth/register", json=new_user()).json()
    headers = {"Authorization": f"Bearer {body['access_token']}", **dict(FORGED_HEADERS)}
    me = httpx.get(mesh.url + "/api/v1/auth/me", headers=headers)
    assert me.status_code == 200 and me.json()["user"]["id"] == body["user"]["id"]


def _viewer_token(mesh: MeshProcess) -> str:
    admin, viewer = new_user(), new_user()
    httpx.post(mesh.url + "/api/v1/auth/register", json=admin)
    viewer_id = httpx.post(mesh.url + "/api/v1/auth/register", json=viewer).json()["user"]["id"]
    grant_role(mesh, admin["username"], "admin")
    admin_token = httpx.post(
        mesh.url + "/api/v1/auth/login",
        json={"username": admin["username"], "password": admin["password"]},
    ).json()["access_token"]
    set_roles = httpx.put(
        f"{mesh.url}/api/v1/users/{viewer_id}/roles",
        json={"roles": ["viewer"]},
        headers={"Authorization": f"Bearer {admin_token}"},
    )
    assert set_roles.status_code == 200, set_roles.text
    login = httpx.post(
        mesh.url + "/api/v1/auth/login",
        json={"username": viewer["username"], "password": viewer["password"]},
    ).json()
    assert login["user"]["roles"] == ["viewer"]
    return str(login["access_token"])


def test_viewer_cannot_call_a_mutation(mesh: MeshProcess) -> None:
    token = _viewer_token(mesh)
    reply = httpx.post(
        mesh.url + "/api/v1/tasks",
        json={"type": "echo", "description": "x"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert_envelope(reply, 403, "INSUFFICIENT_PERMISSIONS")
    stub = tasks_pb2_grpc.TasksServiceStub(grpc.insecure_channel(mesh.services["tasks"]))
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateTask(
            tasks_pb2.CreateTaskRequest(type="echo", description="x"),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(err.value) == "INSUFFICIENT_PERMISSIONS"
    # Reading is what a viewer may do.
    read = httpx.get(mesh.url + "/api/v1/tasks", headers={"Authorization": f"Bearer {token}"})
    assert read.status_code == 200 and read.json()["tasks"] == []


def test_replayed_refresh_token_straight_to_the_server(mesh: MeshProcess) -> None:
    stub = auth_pb2_grpc.AuthServiceStub(grpc.insecure_channel(mesh.services["auth"]))
    user = new_user()
    first = stub.Register(
        auth_pb2.RegisterRequest(email=user["email"], password=user["password"]), timeout=10
    )
    second = stub.Refresh(auth_pb2.RefreshRequest(refresh_token=first.refresh_token), timeout=10)
    with pytest.raises(grpc.RpcError) as replay:
        stub.Refresh(auth_pb2.RefreshRequest(refresh_token=first.refresh_token), timeout=10)
    assert replay.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(replay.value) == "AUTH_REQUIRED"
    # The family is gone: the newer token of the same login no longer works either.
    with pytest.raises(grpc.RpcError) as family:
        stub.Refresh(
            auth_pb2.RefreshRequest(),
            metadata=(("authorization", f"Bearer {second.refresh_token}"),),
            timeout=10,
        )
    assert error_reason(family.value) == "AUTH_REQUIRED"
