"""Request quotas per principal (DESIGN.md, Limits; servers/common/quotas.py), through Envoy
and over gRPC: seed 001's X-RateLimit headers on every counted answer, 429 RATE_LIMIT_EXCEEDED
with Retry-After past the quota, one count per user across its token and keys, one per agent
key, a class of their own for monitoring calls, and the count kept in Redis across restarts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentmesh.v1 import tasks_pb2, tasks_pb2_grpc
from servers.launcher import MeshProcess, free_port
from tests.conftest import SHARED_MESH_ENV, RedisServer
from tests.e2e.test_http_agents import Developer
from tests.helpers import Account, assert_envelope, error_reason, grant_role, register, relogin

GENERAL, MONITORING, AGENT, FREE, WINDOW = 6, 2, 3, 3, 60
QUOTAS = f"general={GENERAL}/{WINDOW},monitoring={MONITORING}/3600,agent={AGENT}/{WINDOW}"
TIERS = f"free={FREE}/3600"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    env = {**SHARED_MESH_ENV, "AGENTMESH_QUOTAS": QUOTAS, "AGENTMESH_TIERS": TIERS}
    with MeshProcess(data_dir=tmp_path_factory.mktemp("quotas"), env=env) as proc:
        yield proc


@pytest.fixture
def client(mesh: MeshProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mesh.url, timeout=10) as http:
        yield http


def _remaining(reply: httpx.Response, limit: int, window: int = WINDOW) -> int:
    """The answer's X-RateLimit-Remaining, after checking its other rate-limit headers."""
    assert reply.headers["x-ratelimit-limit"] == str(limit), reply.headers
    assert reply.headers["x-ratelimit-window"] == str(window)
    reset = int(reply.headers["x-ratelimit-reset"])
    assert time.time() < reset <= time.time() + window + 1
    return int(reply.headers["x-ratelimit-remaining"])


def _assert_refused(reply: httpx.Response, quota: str, limit: int) -> None:
    error = assert_envelope(reply, 429, "RATE_LIMIT_EXCEEDED")
    details = error["details"]
    assert isinstance(details, dict)
    assert details["quota"] == quota and details["limit"] == str(limit)
    assert reply.headers["x-ratelimit-remaining"] == "0"
    assert reply.headers["retry-after"] == details["retry_after"]
    assert 1 <= int(reply.headers["retry-after"]) <= int(details["window"])


def test_every_call_counts_down_and_the_one_past_the_quota_is_refused(
    client: httpx.Client,
) -> None:
    ada, bob = register(client), register(client)
    seen = [_remaining(client.get("/api/v1/auth/me", headers=ada.headers), GENERAL)]
    # An answer that is an error counts too, and says so.
    missing = client.get("/api/v1/tasks/no-such-task", headers=ada.headers)
    assert_envelope(missing, 404, "TASK_NOT_FOUND")
    seen.append(_remaining(missing, GENERAL))
    created = client.post("/api/v1/tasks", json={"description": "x"}, headers=ada.headers)
    assert created.status_code == 201, created.text
    seen.append(_remaining(created, GENERAL))
    for _ in range(GENERAL - 3):
        seen.append(_remaining(client.get("/api/v1/tasks", headers=ada.headers), GENERAL))
    assert seen == list(range(GENERAL - 1, -1, -1))

    _assert_refused(client.get("/api/v1/tasks", headers=ada.headers), "general", GENERAL)
    # Another user has a quota of its own; public calls are not counted.
    assert _remaining(client.get("/api/v1/auth/me", headers=bob.headers), GENERAL) == GENERAL - 1
    health = client.get("/health")
    assert health.status_code == 200 and "x-ratelimit-limit" not in health.headers
    login = client.post(
        "/api/v1/auth/login", json={"username": ada.username, "password": ada.password}
    )
    assert login.status_code == 200 and "x-ratelimit-limit" not in login.headers


def test_a_users_token_and_api_keys_share_one_quota(client: httpx.Client) -> None:
    ada = register(client)
    made = client.post(
        "/api/v1/auth/api-keys", json={"name": "script", "scopes": ["read"]}, headers=ada.headers
    )
    assert made.status_code == 201, made.text
    assert _remaining(made, GENERAL) == GENERAL - 1
    key = {"X-API-Key": made.json()["key"]}
    assert _remaining(client.get("/api/v1/tasks", headers=key), GENERAL) == GENERAL - 2
    assert _remaining(client.get("/api/v1/auth/me", headers=ada.headers), GENERAL) == GENERAL - 3


def test_each_agent_key_has_its_own_quota_apart_from_its_owners(mesh: MeshProcess) -> None:
    dev = Developer(mesh)  # its sign-in and first key: one general call
    second = dev.new_key()
    with (
        httpx.Client(base_url=mesh.url, headers={"Authorization": f"Bearer {dev.key}"}) as one,
        httpx.Client(base_url=mesh.url, headers={"Authorization": f"Bearer {second}"}) as two,
    ):
        hello = {"name": "quota-agent", "capabilities": ["echo"]}
        for n in range(AGENT):
            reply = one.post("/api/v1/agents/register", json=hello)
            assert reply.status_code in (200, 201), reply.text
            assert _remaining(reply, AGENT) == AGENT - 1 - n
        _assert_refused(one.post("/api/v1/agents/register", json=hello), "agent", AGENT)
        reply = two.post("/api/v1/agents/register", json={**hello, "name": "quota-agent-2"})
        assert _remaining(reply, AGENT) == AGENT - 1
    # The agents' calls took nothing from their owner's own quota (two keys made so far).
    mine = httpx.get(mesh.url + "/api/v1/auth/me", headers=dev.headers)
    assert _remaining(mine, GENERAL) == GENERAL - 3


def test_monitoring_calls_have_a_class_of_their_own(client: httpx.Client) -> None:
    ada = register(client)
    for n in range(MONITORING):
        stats = client.get("/api/v1/stats", headers=ada.headers)
        assert stats.status_code == 200, stats.text
        assert _remaining(stats, MONITORING, 3600) == MONITORING - 1 - n
    _assert_refused(client.get("/api/v1/stats", headers=ada.headers), "monitoring", MONITORING)
    assert _remaining(client.get("/api/v1/tasks", headers=ada.headers), GENERAL) == GENERAL - 1


def test_a_stream_counts_once_when_it_opens(client: httpx.Client) -> None:
    ada = register(client)
    with client.stream("GET", "/api/v1/events/stream", headers=ada.headers) as stream:
        assert stream.status_code == 200
        assert _remaining(stream, GENERAL) == GENERAL - 1
        # Heartbeats come every second on this mesh: wait for two of them.
        beats = 0
        for line in stream.iter_lines():
            beats += line == "event: ping"
            if beats == 2:
                break
    assert _remaining(client.get("/api/v1/auth/me", headers=ada.headers), GENERAL) == GENERAL - 2


def test_an_admin_puts_an_account_in_a_tier(mesh: MeshProcess, client: httpx.Client) -> None:
    admin, ada = register(client), register(client)
    grant_role(mesh, admin.username, "admin")
    admin = relogin(client, admin)
    made = client.post(
        "/api/v1/auth/api-keys", json={"name": "script", "scopes": ["read"]}, headers=ada.headers
    )
    assert made.status_code == 201, made.text
    key = {"X-API-Key": made.json()["key"]}

    def set_tier(tier: str, who: Account = admin) -> httpx.Response:
        return client.put(f"/api/v1/users/{ada.id}/tier", json={"tier": tier}, headers=who.headers)

    assert_envelope(set_tier("gold"), 400, "VALIDATION_ERROR")
    assert_envelope(set_tier("enterprise", ada), 403, "INSUFFICIENT_PERMISSIONS")
    put = set_tier("free")
    assert put.status_code == 200 and put.json()["tier"] == "free", put.text
    # The key follows at once: seed 000's free tier, FREE calls an hour, replaces the general
    # quota. The token, which carries the old tier, is refused: the next sign-in (or refresh)
    # carries the new one.
    assert _remaining(client.get("/api/v1/tasks", headers=key), FREE, 3600) == FREE - 1
    assert_envelope(client.get("/api/v1/auth/me", headers=ada.headers), 401, "AUTH_REQUIRED")
    ada = relogin(client, ada)
    assert _remaining(client.get("/api/v1/auth/me", headers=ada.headers), FREE, 3600) == FREE - 2
    assert _remaining(client.get("/api/v1/auth/me", headers=ada.headers), FREE, 3600) == 0
    refused = client.get("/api/v1/tasks", headers=key)
    _assert_refused(refused, "general", FREE)
    assert refused.json()["error"]["details"]["tier"] == "free"
    # Enterprise has no limit: nothing counted, nothing said.
    assert set_tier("enterprise").json()["tier"] == "enterprise"
    unlimited = client.get("/api/v1/tasks", headers=key)
    assert unlimited.status_code == 200 and "x-ratelimit-limit" not in unlimited.headers


def test_refusals_are_counted_for_prometheus(mesh: MeshProcess, client: httpx.Client) -> None:
    def refused(headers: dict[str, str]) -> float:
        scrape = client.get("/metrics", headers=headers)
        assert scrape.status_code == 200, scrape.text
        samples = {
            sample.labels.get("quota"): sample.value
            for family in text_string_to_metric_families(scrape.text)
            for sample in family.samples
            if sample.name == "agentmesh_quota_refused_total"
        }
        return samples.get("general", 0.0)

    viewer = register(client)
    grant_role(mesh, viewer.username, "viewer")
    viewer = relogin(client, viewer)
    before = refused(viewer.headers)
    ada = register(client)
    for _ in range(GENERAL):
        assert client.get("/api/v1/tasks", headers=ada.headers).status_code == 200
    for _ in range(2):
        _assert_refused(client.get("/api/v1/tasks", headers=ada.headers), "general", GENERAL)
    assert refused(viewer.headers) == before + 2


def test_grpc_callers_get_the_headers_as_trailing_metadata(
    mesh: MeshProcess, client: httpx.Client
) -> None:
    ada: Account = register(client)
    with grpc.insecure_channel(mesh.services["tasks"]) as channel:
        stub = tasks_pb2_grpc.TasksServiceStub(channel)
        for n in range(GENERAL):
            _, call = stub.ListTasks.with_call(
                tasks_pb2.ListTasksRequest(), metadata=ada.metadata, timeout=10
            )
            trailing = dict(call.trailing_metadata())
            assert trailing["x-ratelimit-limit"] == str(GENERAL)
            assert trailing["x-ratelimit-remaining"] == str(GENERAL - 1 - n)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListTasks(tasks_pb2.ListTasksRequest(), metadata=ada.metadata, timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(refused.value) == "RATE_LIMIT_EXCEEDED"
    trailing = dict(refused.value.trailing_metadata())
    assert trailing["x-ratelimit-remaining"] == "0"


def test_the_count_lives_in_redis_across_restarts(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    url, _ = redis_server
    port = free_port()
    env = {**SHARED_MESH_ENV, "AGENTMESH_QUOTAS": "general=2/60", "REDIS_URL": url}
    with MeshProcess(data_dir=tmp_path, port=port, env=env) as mesh:
        with httpx.Client(base_url=mesh.url, timeout=10) as http:
            ada = register(http)
            for _ in range(2):
                assert http.get("/api/v1/auth/me", headers=ada.headers).status_code == 200
    # A restarted mesh (or another replica) shares the count; one in memory would start again.
    with MeshProcess(data_dir=tmp_path, port=port, env=env) as mesh:
        with httpx.Client(base_url=mesh.url, timeout=10) as http:
            _assert_refused(http.get("/api/v1/auth/me", headers=ada.headers), "general", 2)
