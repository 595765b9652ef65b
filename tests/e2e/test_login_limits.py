"""Seed 001's authentication limit: 10 login attempts an hour per client address and per
account, with 429 RATE_LIMIT_EXCEEDED, retry_after and Retry-After; kept in Redis when there is
one, and still enforced while Redis is down."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import grpc
import httpx
import pytest

from agentmesh.v1 import auth_pb2, auth_pb2_grpc
from servers.launcher import MeshProcess, free_port
from tests.conftest import RedisServer
from tests.helpers import assert_envelope, error_reason, new_user

LIMIT = 10


def _login(url: str, username: str, password: str = "wrong-pass-1") -> httpx.Response:
    return httpx.post(url + "/api/v1/auth/login", json={"username": username, "password": password})


def _assert_limited(reply: httpx.Response) -> None:
    error = assert_envelope(reply, 429, "RATE_LIMIT_EXCEEDED")
    details = error["details"]
    assert isinstance(details, dict)
    retry_after = int(details["retry_after"])
    assert 0 < retry_after <= 3600
    assert reply.headers["retry-after"] == str(retry_after)


def test_per_address_limit_through_envoy(tmp_path: Path) -> None:
    with MeshProcess(data_dir=tmp_path) as mesh:
        user = new_user()
        httpx.post(mesh.url + "/api/v1/auth/register", json=user)
        # Ten attempts from one address, on different accounts, are answered normally...
        for i in range(LIMIT - 1):
            assert_envelope(_login(mesh.url, f"nobody-{i}"), 401, "INVALID_CREDENTIALS")
        assert _login(mesh.url, user["username"], user["password"]).status_code == 200
        # ...the eleventh is refused, even with the right password.
        _assert_limited(_login(mesh.url, user["username"], user["password"]))


def test_per_account_limit_across_addresses(tmp_path: Path) -> None:
    with MeshProcess(data_dir=tmp_path) as mesh:
        user = new_user()
        httpx.post(mesh.url + "/api/v1/auth/register", json=user)
        stub = auth_pb2_grpc.AuthServiceStub(grpc.insecure_channel(mesh.services["auth"]))

        def attempt(address: str) -> None:
            stub.Login(
                auth_pb2.LoginRequest(username=user["username"], password="wrong-pass-1"),
                metadata=(("x-forwarded-for", address),),
                timeout=10,
            )

        # An attacker spreading guesses over many addresses still meets the account's limit.
        for i in range(LIMIT):
            with pytest.raises(grpc.RpcError) as err:
                attempt(f"10.0.0.{i}")
            assert error_reason(err.value) == "INVALID_CREDENTIALS"
        with pytest.raises(grpc.RpcError) as err:
            attempt("10.0.1.1")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(err.value) == "RATE_LIMIT_EXCEEDED"


def test_limits_live_in_redis_across_restarts(tmp_path: Path, redis_server: RedisServer) -> None:
    url, _ = redis_server
    port = free_port()
    with MeshProcess(data_dir=tmp_path, port=port, env={"REDIS_URL": url}) as mesh:
        for i in range(LIMIT):
            _login(mesh.url, f"ghost-{i}")
    # A restarted mesh (or another replica) shares the count.
    with MeshProcess(data_dir=tmp_path, port=port, env={"REDIS_URL": url}) as mesh:
        _assert_limited(_login(mesh.url, "ghost-x"))


def test_limits_hold_while_redis_is_down(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with MeshProcess(data_dir=tmp_path, env={"REDIS_URL": dead}) as mesh:
        for i in range(LIMIT):
            assert_envelope(_login(mesh.url, f"ghost-{i}"), 401, "INVALID_CREDENTIALS")
        _assert_limited(_login(mesh.url, "ghost-x"))


def test_unknown_user_and_wrong_password_take_about_as_long(mesh: MeshProcess) -> None:
    user = new_user()
    httpx.post(mesh.url + "/api/v1/auth/register", json=user)

    def timed(username: str) -> float:
        started = time.perf_counter()
        assert _login(mesh.url, username).status_code == 401
        return time.perf_counter() - started

    wrong = statistics.median(timed(user["username"]) for _ in range(7))
    unknown = statistics.median(timed(f"nobody-{i}") for i in range(7))
    # Both verify an argon2id hash; without the dummy hash, unknown would be ~100x faster.
    assert 0.5 < unknown / wrong < 2.0, (unknown, wrong)


def test_an_oversized_login_is_refused_cheaply(mesh: MeshProcess) -> None:
    reply = _login(mesh.url, "x" * 100_000)
    assert_envelope(reply, 401, "INVALID_CREDENTIALS")
