"""The interceptor stack on a real grpc.aio server: request ids, error mapping, authentication."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agentmesh.v1 import health_pb2, health_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from servers.auth.keys import SigningKey
from servers.common import errors
from servers.common.auth import Authenticator, TokenVerifier
from servers.common.context import Principal, principal
from servers.common.interceptors import default_interceptors
from tests.attacks import forged_tokens, sign
from tests.helpers import error_reason

ISSUER = AUDIENCE = "agentmesh"


class Failing(health_pb2_grpc.HealthServiceServicer):
    """GetLiveness raises whatever the test put in ``failure``."""

    failure: BaseException | None = None

    async def GetLiveness(
        self, request: health_pb2.GetLivenessRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.GetLivenessResponse:
        if self.failure is not None:
            raise self.failure
        return health_pb2.GetLivenessResponse(status="alive")


class WhoAmI(tasks_pb2_grpc.TasksServiceServicer):
    async def GetTask(
        self, request: tasks_pb2.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.Task:
        who = principal()
        assert who is not None
        # "huge": a response past gRPC's 4 MiB message limit, as an unbounded list would be.
        description = "d" * (5 << 20) if request.task_id == "huge" else ""
        return tasks_pb2.Task(
            task_id=request.task_id, owner_id=who.subject, description=description
        )


async def _no_keys(secret: str) -> Principal:
    raise errors.AuthRequired("invalid API key")


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return SigningKey.load_or_create(tmp_path)


@pytest.fixture
async def server(key: SigningKey) -> AsyncIterator[tuple[str, Failing]]:
    verifier = TokenVerifier(jwks=key.jwks, issuer=ISSUER, audience=AUDIENCE)
    auth = Authenticator(verifier=verifier, internal_token="internal-secret", api_keys=_no_keys)
    srv = grpc.aio.server(interceptors=default_interceptors(auth))
    failing = Failing()
    health_pb2_grpc.add_HealthServiceServicer_to_server(failing, srv)
    tasks_pb2_grpc.add_TasksServiceServicer_to_server(WhoAmI(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    try:
        yield f"127.0.0.1:{port}", failing
    finally:
        await srv.stop(None)


async def _live(address: str) -> tuple[health_pb2.GetLivenessResponse, grpc.aio.Call]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = health_pb2_grpc.HealthServiceStub(channel).GetLiveness(
            health_pb2.GetLivenessRequest(), metadata=(("x-request-id", "client-req-1"),)
        )
        reply = await call
        return reply, call


async def test_request_id_is_returned(server: tuple[str, Failing]) -> None:
    address, _ = server
    _, call = await _live(address)
    assert dict(await call.trailing_metadata())["x-request-id"] == "client-req-1"


@pytest.mark.parametrize(
    ("failure", "code", "reason"),
    [
        (errors.ValidationError("bad"), grpc.StatusCode.INVALID_ARGUMENT, "VALIDATION_ERROR"),
        (
            errors.NotFound("gone", reason="TASK_NOT_FOUND"),
            grpc.StatusCode.NOT_FOUND,
            "TASK_NOT_FOUND",
        ),
        (errors.Conflict("state"), grpc.StatusCode.ABORTED, "CONFLICT"),
        (
            errors.RateLimited("slow down"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMIT_EXCEEDED",
        ),
        (NotImplementedError(), grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED"),
        (ZeroDivisionError("secret detail"), grpc.StatusCode.INTERNAL, "INTERNAL_ERROR"),
    ],
)
async def test_errors_become_statuses(
    server: tuple[str, Failing], failure: BaseException, code: grpc.StatusCode, reason: str
) -> None:
    address, failing = server
    failing.failure = failure
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _live(address)
    assert err.value.code() == code
    assert error_reason(err.value) == reason
    # An unexpected failure never shows its details to the client.
    assert "secret detail" not in (err.value.details() or "")
    trailers = dict(err.value.trailing_metadata() or ())
    assert trailers.get("x-request-id") == "client-req-1"


async def _get_task(address: str, token: str | None, task_id: str = "t1") -> tasks_pb2.Task:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = tasks_pb2_grpc.TasksServiceStub(channel)
        return await stub.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id), metadata=metadata)


async def test_a_response_past_the_message_limit_is_an_internal_error(
    server: tuple[str, Failing], key: SigningKey
) -> None:
    """grpc fails such a response with RESOURCE_EXHAUSTED, which Envoy answers as 429
    RATE_LIMIT_EXCEEDED: a REST client would back off and retry for ever. It is a bug."""
    address, _ = server
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _get_task(address, sign(key.private_key, key.kid), task_id="huge")
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert error_reason(err.value) == "INTERNAL_ERROR"


async def test_valid_token_sets_the_principal(server: tuple[str, Failing], key: SigningKey) -> None:
    address, _ = server
    task = await _get_task(address, sign(key.private_key, key.kid))
    assert task.owner_id == "u1"


async def test_forged_tokens_are_refused(server: tuple[str, Failing], key: SigningKey) -> None:
    address, _ = server
    for name, (token, reason) in forged_tokens(key.private_key, key.kid).items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _get_task(address, token)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert error_reason(err.value) == reason, name


async def test_forged_identity_headers_are_ignored(server: tuple[str, Failing]) -> None:
    address, _ = server
    async with grpc.aio.insecure_channel(address) as channel:
        stub = tasks_pb2_grpc.TasksServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetTask(
                tasks_pb2.GetTaskRequest(task_id="t1"),
                metadata=(("x-jwt-sub", "admin"), ("x-user-id", "admin"), ("x-roles", "admin")),
            )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
