"""The interceptor stack on a real grpc.aio server: request ids, error mapping, authentication."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agentmesh.v1 import health_pb2, health_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from servers.auth.keys import SigningKey
from servers.common import errors
from servers.common.auth import Authenticator, TokenVerifier
from servers.common.context import Principal, principal
from servers.common.interceptors import default_interceptors
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
        return tasks_pb2.Task(task_id=request.task_id, owner_id=who.subject)


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


def _token(key: ec.EllipticCurvePrivateKey, kid: str, **overrides: object) -> str:
    now = int(time.time())
    claims = {
        "sub": "u1",
        "username": "u",
        "roles": ["user"],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
        "jti": "j",
        "typ": "access",
        **overrides,
    }
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


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


async def _get_task(address: str, token: str | None) -> tasks_pb2.Task:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = tasks_pb2_grpc.TasksServiceStub(channel)
        return await stub.GetTask(tasks_pb2.GetTaskRequest(task_id="t1"), metadata=metadata)


async def test_valid_token_sets_the_principal(server: tuple[str, Failing], key: SigningKey) -> None:
    address, _ = server
    task = await _get_task(address, _token(key.private_key, key.kid))
    assert task.owner_id == "u1"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _hs256(claims: dict[str, object], secret: bytes, kid: str) -> str:
    """Signs by hand: PyJWT rightly refuses to use a PEM public key as an HMAC secret."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = _b64(json.dumps(claims).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(mac)}"


def _unsigned(claims: dict[str, object], kid: str) -> str:
    """An `alg: none` token: claims with an empty signature."""
    head = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    return f"{head}.{_b64(json.dumps(claims).encode())}."


def _attacks(key: SigningKey) -> dict[str, tuple[str, str]]:
    """Forged or unacceptable tokens, each with the reason the server must answer."""
    other = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    good = _token(key.private_key, key.kid)
    head, body, sig = good.split(".")
    tampered_sig = sig[:-4] + ("AAAA" if not sig.endswith("AAAA") else "BBBB")
    public_pem = key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {
        "sub": "u1",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 60,
        "jti": "j",
        "typ": "access",
        "roles": ["admin"],
    }
    return {
        "alg none": (_unsigned(claims, key.kid), "AUTH_REQUIRED"),
        # The classic key-confusion attack: HMAC keyed with the (public) verification key.
        "HS256 with the public key": (_hs256(claims, public_pem, key.kid), "AUTH_REQUIRED"),
        "foreign kid": (_token(other, "someone-elses-key"), "AUTH_REQUIRED"),
        "right kid, other key": (_token(other, key.kid), "AUTH_REQUIRED"),
        "expired": (
            _token(key.private_key, key.kid, iat=now - 7200, exp=now - 3600),
            "TOKEN_EXPIRED",
        ),
        "not yet valid": (_token(key.private_key, key.kid, nbf=now + 3600), "AUTH_REQUIRED"),
        "wrong audience": (_token(key.private_key, key.kid, aud="elsewhere"), "AUTH_REQUIRED"),
        "wrong issuer": (_token(key.private_key, key.kid, iss="evil"), "AUTH_REQUIRED"),
        "tampered signature": (f"{head}.{body}.{tampered_sig}", "AUTH_REQUIRED"),
        "refresh-type token": (_token(key.private_key, key.kid, typ="refresh"), "AUTH_REQUIRED"),
        "garbage": ("not-a-jwt", "AUTH_REQUIRED"),
    }


async def test_forged_tokens_are_refused(server: tuple[str, Failing], key: SigningKey) -> None:
    address, _ = server
    for name, (token, reason) in _attacks(key).items():
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
