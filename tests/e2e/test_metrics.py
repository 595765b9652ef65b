"""Monitoring through Envoy: seed 004's GET /api/v1/metrics and the Prometheus text at /metrics,
on a mesh of their own (the figures are mesh-wide), with a real reference agent doing work."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from servers.launcher import MeshProcess
from tests.e2e.test_agents import FAST, Owner, wait_until
from tests.e2e.test_agents import agents as agents  # the fixture
from tests.helpers import assert_envelope, grant_role, new_user

Json = dict[str, Any]


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[MeshProcess]:
    # With a metrics port of its own (AGENTMESH_METRICS_PORT; 0: a free one).
    with MeshProcess(
        data_dir=tmp_path / "mesh", env={**FAST, "AGENTMESH_METRICS_PORT": "0"}
    ) as proc:
        yield proc


def _signed_in(mesh: MeshProcess, role: str = "") -> dict[str, str]:
    """A new user, with ``role`` added to its own, signed in: its Authorization header."""
    user = new_user()
    assert httpx.post(mesh.url + "/api/v1/auth/register", json=user).status_code == 201
    if role:
        grant_role(mesh, user["username"], role)
    reply = httpx.post(
        mesh.url + "/api/v1/auth/login",
        json={"username": user["username"], "password": user["password"]},
    )
    assert reply.status_code == 200, reply.text
    return {"Authorization": f"Bearer {reply.json()['access_token']}"}


def _key(mesh: MeshProcess, headers: dict[str, str], *scopes: str) -> str:
    reply = httpx.post(
        mesh.url + "/api/v1/auth/api-keys",
        json={"name": "scraper", "scopes": list(scopes)},
        headers=headers,
    )
    assert reply.status_code == 201, reply.text
    return str(reply.json()["key"])


def _metrics(mesh: MeshProcess, headers: dict[str, str]) -> Json:
    reply = httpx.get(mesh.url + "/api/v1/metrics", headers=headers)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, parsed (which also checks its syntax)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _handled(samples: dict[Any, float], method: str, code: str) -> float:
    labels = {
        ("grpc_service", "agentmesh.v1.TasksService"),
        ("grpc_method", method),
        ("grpc_code", code),
    }
    return samples.get(("agentmesh_grpc_server_handled_total", frozenset(labels)), 0.0)


def test_seed_004_metrics_show_the_agents_and_the_work(
    mesh: MeshProcess, agents: Callable[..., Any]
) -> None:
    owner = Owner(mesh)
    viewer = _signed_in(mesh, "viewer")
    # Seed 004: metrics are for viewers and admins; nobody else, and not anonymously.
    assert_envelope(httpx.get(mesh.url + "/api/v1/metrics"), 401, "AUTH_REQUIRED")
    for other in (_signed_in(mesh), owner.headers):
        refused = httpx.get(mesh.url + "/api/v1/metrics", headers=other)
        assert_envelope(refused, 403, "INSUFFICIENT_PERMISSIONS")

    empty = _metrics(mesh, viewer)
    assert empty["agents"] == {
        "total": 0,
        "active": 0,
        "tasks_queued": 0,
        "tasks_processing": 0,
        "tasks_completed_today": 0,
    }

    agents(mesh, owner.key, "worker", "echo", "sleep")
    done = [owner.create(type="echo", description=f"echo {n}") for n in range(2)]
    done.append(owner.create(type="sleep", description="nap", metadata={"seconds": 1}))
    running = owner.create(type="sleep", description="hold", metadata={"seconds": 60})
    owner.create(type="translate", description="no agent can do this")
    wait_until(
        lambda: (
            all(owner.task(t["task_id"])["status"] == "completed" for t in done)
            and owner.task(running["task_id"])["status"] == "running"
        ),
        30,
        "three tasks done and one running",
    )

    figures = _metrics(mesh, viewer)
    assert figures["agents"] == {
        "total": 1,
        "active": 1,
        "tasks_queued": 1,
        "tasks_processing": 1,
        "tasks_completed_today": 3,
    }
    performance = figures["performance"]
    assert performance["error_rate"] == 0
    # Run times: about 1 s for the nap, next to nothing for an echo.
    assert 0.3 < performance["average_task_duration"] < performance["p95_task_duration"] < 5
    assert performance["p95_task_duration"] >= 1
    system = figures["system"]
    assert 0 <= system["cpu_usage"] <= 100 and 0 < system["disk_usage"] <= 100
    assert 0 < system["memory_usage"] < system["memory_total"]
    # Seed 004 prints these as JSON numbers.
    assert all(isinstance(v, int | float) for block in figures.values() for v in block.values())


def test_prometheus_text_for_a_scrapers_key(mesh: MeshProcess) -> None:
    owner = Owner(mesh)
    viewer = _signed_in(mesh, "viewer")
    scraper = {"X-API-Key": _key(mesh, viewer, "read")}
    for n in range(3):
        owner.create(type="echo", description=f"queued {n}")
    refused = httpx.post(mesh.url + "/api/v1/tasks", json={"type": "echo"}, headers=owner.headers)
    assert_envelope(refused, 400, "VALIDATION_ERROR")

    reply = httpx.get(mesh.url + "/metrics", headers=scraper)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = _samples(reply.text)
    assert _handled(samples, "CreateTask", "OK") == 3
    assert _handled(samples, "CreateTask", "INVALID_ARGUMENT") == 1
    assert samples[("agentmesh_tasks", frozenset({("status", "queued")}))] == 3
    assert samples[("agentmesh_tasks", frozenset({("status", "completed")}))] == 0
    assert samples[("agentmesh_agents", frozenset({("state", "registered")}))] == 0
    assert samples[("process_cpu_seconds_total", frozenset())] > 0
    duration = (
        "agentmesh_grpc_server_handling_seconds_count",
        frozenset({("grpc_service", "agentmesh.v1.TasksService"), ("grpc_method", "CreateTask")}),
    )
    assert samples[duration] == 4
    # The same key as a bearer token works too; an agent's key may not read metrics.
    bearer = {"Authorization": f"Bearer {scraper['X-API-Key']}"}
    assert httpx.get(mesh.url + "/metrics", headers=bearer).status_code == 200
    agent_key = {"X-API-Key": owner.key}
    assert_envelope(
        httpx.get(mesh.url + "/metrics", headers=agent_key), 403, "INSUFFICIENT_PERMISSIONS"
    )

    # The process's own port answers the same, to the same callers only.
    own = f"http://{mesh.metrics}/metrics"
    direct = httpx.get(own, headers=scraper)
    assert direct.status_code == 200, direct.text
    assert direct.headers["content-type"] == reply.headers["content-type"]
    mine = _samples(direct.text)
    assert _handled(mine, "CreateTask", "OK") == 3
    assert mine[("agentmesh_tasks", frozenset({("status", "queued")}))] == 3
    assert_envelope(httpx.get(own, headers=agent_key), 403, "INSUFFICIENT_PERMISSIONS")
    assert_envelope(httpx.get(own), 401, "AUTH_REQUIRED")


def test_a_lease_that_runs_out_is_counted(mesh: MeshProcess, agents: Callable[..., Any]) -> None:
    owner = Owner(mesh)
    admin = _signed_in(mesh, "admin")
    frozen = agents(mesh, owner.key, "frozen", "sleep")
    task = owner.create(type="sleep", description="nap", metadata={"seconds": 30}, max_attempts=1)
    wait_until(lambda: owner.task(task["task_id"])["status"] == "running", 20, "the agent to start")
    os.kill(frozen.pid, signal.SIGSTOP)
    wait_until(lambda: owner.task(task["task_id"])["status"] == "failed", 20, "the lease to end")

    samples = _samples(httpx.get(mesh.url + "/metrics", headers=admin).text)
    expired = "agentmesh_task_leases_expired_total"
    assert samples[(expired, frozenset({("outcome", "failed")}))] == 1
    assert (expired, frozenset({("outcome", "requeued")})) not in samples
    assert samples[("agentmesh_tasks", frozenset({("status", "failed")}))] == 1
    assert _metrics(mesh, admin)["performance"]["error_rate"] == 1


def test_seed_001_observability_endpoints(mesh: MeshProcess) -> None:
    """What this mesh served and made, since it started (one process: all four services), and
    its latest calls, as seed 001's observability endpoints show them."""
    viewer = _signed_in(mesh, "viewer")
    dev = _signed_in(mesh, "developer")
    me = httpx.get(mesh.url + "/api/v1/auth/me", headers=dev).json()["user"]["id"]
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traced = {**dev, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    for _ in range(2):
        created = httpx.post(mesh.url + "/api/v1/tasks", json={"description": "x"}, headers=traced)
        assert created.status_code == 201, created.text
    missing = httpx.get(mesh.url + "/api/v1/tasks/not-a-task", headers=dev)
    assert missing.status_code == 404

    def figures() -> Json:
        reply = httpx.get(mesh.url + "/api/v1/observability/metrics", headers=viewer)
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    wait_until(lambda: figures()["events"]["task_events"] >= 2, 10, "the tasks' events")
    seen = figures()
    traces, spans, events = seen["traces"], seen["spans"], seen["events"]
    assert traces["total"] >= 5 and 0 < traces["average_latency"] < 10_000
    assert traces["error_rate"] == 0  # a 404 is the caller's, not the server's
    assert spans["db_spans"] > 0 and spans["external_spans"] == 0  # no Redis, no callbacks
    assert spans["total"] == traces["total"] + spans["db_spans"] + spans["external_spans"]
    assert events["total"] >= events["task_events"] + events["agent_events"]

    reply = httpx.get(
        mesh.url + "/api/observability/traces/active", params={"limit": 5}, headers=viewer
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["x-api-deprecation-info"].startswith(
        "use /api/v1/observability/traces/active"
    )
    latest = reply.json()
    assert isinstance(latest, list) and len(latest) == 5
    # The call asking is in flight; the ones before it ended, newest first.
    assert latest[0]["operation_name"] == "list_active_traces"
    assert latest[0]["tags"]["status"] == "IN_FLIGHT"
    # Known while in flight, as a stream's caller is for all of its life.
    viewer_id = httpx.get(mesh.url + "/api/v1/auth/me", headers=viewer).json()["user"]["id"]
    assert latest[0]["tags"]["user_id"] == viewer_id
    assert latest[0]["trace_id"] == latest[0]["tags"]["request_id"].replace("-", "")
    assert latest[0]["trace_id"] == reply.headers["x-request-id"].replace("-", "")
    ended = [t["start_time"] for t in latest[1:]]
    assert ended == sorted(ended, reverse=True)
    every = httpx.get(
        mesh.url + "/api/v1/observability/traces/active", params={"limit": 100}, headers=viewer
    ).json()
    creates = [t for t in every if t["operation_name"] == "create_task"]
    assert len(creates) == 2
    assert {t["trace_id"] for t in creates} == {trace_id}  # the caller's traceparent
    assert len({t["span_id"] for t in creates}) == 2
    assert all(t["tags"]["user_id"] == me and t["tags"]["status"] == "OK" for t in creates)
    assert all(t["duration"] > 0 for t in creates)
    lookups = [t for t in every if t["operation_name"] == "get_task"]
    assert [t["tags"]["status"] for t in lookups] == ["NOT_FOUND"]

    for path in ("/api/v1/observability/metrics", "/api/v1/observability/traces/active"):
        assert_envelope(httpx.get(mesh.url + path), 401, "AUTH_REQUIRED")
        assert_envelope(httpx.get(mesh.url + path, headers=dev), 403, "INSUFFICIENT_PERMISSIONS")
    too_many = httpx.get(
        mesh.url + "/api/v1/observability/traces/active", params={"limit": 101}, headers=viewer
    )
    assert_envelope(too_many, 400, "VALIDATION_ERROR")
