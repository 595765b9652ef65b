"""The same promises over gRPC with the generated stubs: straight to a server, and through Envoy."""

from __future__ import annotations

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2 as grpc_health_pb2
from grpc_health.v1 import health_pb2_grpc as grpc_health_pb2_grpc

from agentmesh.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    health_pb2,
    health_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)
from servers.launcher import MeshProcess
from tests.helpers import error_reason, new_user


def _auth(address: str) -> auth_pb2_grpc.AuthServiceStub:
    return auth_pb2_grpc.AuthServiceStub(grpc.insecure_channel(address))


def _register(stub: auth_pb2_grpc.AuthServiceStub) -> tuple[dict[str, str], auth_pb2.AuthTokens]:
    user = new_user()
    tokens = stub.Register(
        auth_pb2.RegisterRequest(
            username=user["username"], email=user["email"], password=user["password"]
        ),
        timeout=10,
    )
    return user, tokens


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(params=["direct", "envoy"])
def auth_address(request: pytest.FixtureRequest, mesh: MeshProcess) -> str:
    """The auth service straight on its port, and through Envoy's public listener."""
    if request.param == "direct":
        return mesh.services["auth"]
    return mesh.url.removeprefix("http://")


def test_register_login_me(auth_address: str) -> None:
    stub = _auth(auth_address)
    user, registered = _register(stub)
    login = stub.Login(
        auth_pb2.LoginRequest(username=user["username"], password=user["password"]), timeout=10
    )
    me, call = stub.GetMe.with_call(
        auth_pb2.GetMeRequest(), metadata=_bearer(login.access_token), timeout=10
    )
    assert me.user.id == registered.user.id
    assert me.user.email == user["email"]
    trailers = dict(call.trailing_metadata() or ())
    initial = dict(call.initial_metadata() or ())
    assert trailers.get("x-request-id") or initial.get("x-request-id")


def test_errors_carry_the_documented_reason(auth_address: str) -> None:
    stub = _auth(auth_address)
    user, _ = _register(stub)
    with pytest.raises(grpc.RpcError) as dup:
        stub.Register(
            auth_pb2.RegisterRequest(email=user["email"], password=user["password"]), timeout=10
        )
    assert dup.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(dup.value) == "USER_EXISTS"

    with pytest.raises(grpc.RpcError) as weak:
        stub.Register(auth_pb2.RegisterRequest(email="a@example.com", password="x"), timeout=10)
    assert weak.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(weak.value) == "VALIDATION_ERROR"

    with pytest.raises(grpc.RpcError) as bad:
        stub.Login(auth_pb2.LoginRequest(username=user["username"], password="no-9999"), timeout=10)
    assert bad.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(bad.value) == "INVALID_CREDENTIALS"


def test_a_number_json_cannot_hold_is_a_validation_error(
    auth_address: str, mesh: MeshProcess
) -> None:
    """protobuf's binary form carries NaN and Infinity in a Struct; the JSON the mesh keeps
    cannot. Such metadata is the caller's error, not an INTERNAL crash."""
    _, tokens = _register(_auth(auth_address))
    with grpc.insecure_channel(mesh.url.removeprefix("http://")) as channel:
        stub = tasks_pb2_grpc.TasksServiceStub(channel)
        for number in (math.nan, math.inf, -math.inf):
            request = tasks_pb2.CreateTaskRequest(type="echo", description="x")
            request.metadata.update({"score": number})
            with pytest.raises(grpc.RpcError) as refused:
                stub.CreateTask(request, metadata=_bearer(tokens.access_token), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_reason(refused.value) == "VALIDATION_ERROR"
            assert "NaN or Infinity" in (refused.value.details() or "")


def test_me_without_a_token_is_unauthenticated(auth_address: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _auth(auth_address).GetMe(auth_pb2.GetMeRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_me_without_a_token_direct_says_auth_required(mesh: MeshProcess) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _auth(mesh.services["auth"]).GetMe(auth_pb2.GetMeRequest(), timeout=10)
    assert error_reason(err.value) == "AUTH_REQUIRED"


def test_unknown_rpc_is_unimplemented(mesh: MeshProcess) -> None:
    _, tokens = _register(_auth(mesh.services["auth"]))
    for address in (mesh.services["messaging"], mesh.url.removeprefix("http://")):
        with grpc.insecure_channel(address) as channel:
            call = channel.unary_unary("/agentmesh.v1.EventsService/NoSuchMethod")
            with pytest.raises(grpc.RpcError) as err:
                call(b"", metadata=_bearer(tokens.access_token), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_internal_rpcs_are_refused_from_outside(mesh: MeshProcess) -> None:
    _, tokens = _register(_auth(mesh.services["auth"]))
    request = auth_pb2.VerifyApiKeyRequest(key="amk_anything")
    # Straight to the server, a user's token is not the mesh's internal credential.
    direct = auth_pb2_grpc.AuthInternalServiceStub(grpc.insecure_channel(mesh.services["auth"]))
    with pytest.raises(grpc.RpcError) as err:
        direct.VerifyApiKey(request, metadata=_bearer(tokens.access_token), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Through Envoy there is no route to an internal service at all.
    edge = auth_pb2_grpc.AuthInternalServiceStub(
        grpc.insecure_channel(mesh.url.removeprefix("http://"))
    )
    with pytest.raises(grpc.RpcError) as err:
        edge.VerifyApiKey(request, metadata=_bearer(tokens.access_token), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # Envoy's 404, said in gRPC


def test_every_server_reports_grpc_health(mesh: MeshProcess) -> None:
    for name, address in mesh.services.items():
        stub = grpc_health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
        reply = stub.Check(grpc_health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == grpc_health_pb2.HealthCheckResponse.SERVING, name


def test_rest_health_service_over_grpc(mesh: MeshProcess) -> None:
    stub = health_pb2_grpc.HealthServiceStub(grpc.insecure_channel(mesh.services["auth"]))
    reply = stub.GetHealth(health_pb2.GetHealthRequest(), timeout=5)
    assert reply.status == "healthy"
    assert reply.services["database"] == "up"
