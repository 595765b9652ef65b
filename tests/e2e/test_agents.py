"""Real agent processes (`agentmesh agent run`) against a real mesh: work gets done, and nothing
is lost or done twice when an agent is killed, frozen past its lease, or the mesh restarts."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from servers.agents.service import agent_id_of
from servers.launcher import MeshProcess, free_port
from tests.helpers import grant_role, new_user

# Short leases and heartbeats, so that losing one takes seconds, not half a minute.
FAST = {
    "AGENTMESH_LEASE_SECONDS": "3",
    "AGENTMESH_HEARTBEAT_SECONDS": "1",
    "AGENTMESH_LOGIN_LIMIT": "100000",
    "AGENTMESH_REGISTER_LIMIT": "100000",
}


class Owner:
    """A developer with an agent-scoped API key."""

    def __init__(self, mesh: MeshProcess) -> None:
        self.mesh = mesh
        self.user = new_user()
        httpx.post(mesh.url + "/api/v1/auth/register", json=self.user)
        grant_role(mesh, self.user["username"], "developer")
        self.login()
        reply = httpx.post(
            mesh.url + "/api/v1/auth/api-keys",
            json={"name": "workers", "scopes": ["agent"]},
            headers=self.headers,
        )
        assert reply.status_code == 201, reply.text
        self.key = reply.json()["key"]
        self.id = str(self.me()["id"])

    def login(self) -> None:
        reply = httpx.post(
            self.mesh.url + "/api/v1/auth/login",
            json={"username": self.user["username"], "password": self.user["password"]},
        )
        assert reply.status_code == 200, reply.text
        self.headers = {"Authorization": f"Bearer {reply.json()['access_token']}"}

    def me(self) -> dict[str, Any]:
        return dict(
            httpx.get(self.mesh.url + "/api/v1/auth/me", headers=self.headers).json()["user"]
        )

    def create(self, **task: object) -> dict[str, Any]:
        reply = httpx.post(self.mesh.url + "/api/v1/tasks", json=task, headers=self.headers)
        assert reply.status_code == 201, reply.text
        return dict(reply.json())

    def task(self, task_id: str) -> dict[str, Any]:
        reply = httpx.get(f"{self.mesh.url}/api/v1/tasks/{task_id}", headers=self.headers)
        assert reply.status_code == 200, reply.text
        return dict(reply.json())


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts reference agents; kills whatever is left at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(
        mesh: MeshProcess, key: str, name: str, *capabilities: str
    ) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"agent-{name}.log").open("ab")
        args = [
            sys.executable,
            "-m",
            "servers.cli",
            "agent",
            "run",
            "--name",
            name,
            "--target",
            mesh.url.removeprefix("http://"),
            "--workdir",
            str(tmp_path),
        ]
        for capability in capabilities or ("echo", "sleep"):
            args += ["--capability", capability]
        proc = subprocess.Popen(
            args,
            env={**os.environ, "AGENTMESH_API_KEY": key},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def completed_events(mesh: MeshProcess, task_id: str) -> int:
    """How many times the task was recorded as completed (the outbox keeps every change)."""
    with sqlite3.connect(mesh.data_dir / "agentmesh.db") as db:
        (count,) = db.execute(
            "SELECT count(*) FROM tasks_outbox WHERE subject_id = ? AND event_type = ?",
            (task_id, "task.completed"),
        ).fetchone()
    return int(count)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[MeshProcess]:
    with MeshProcess(data_dir=tmp_path / "mesh", env=FAST) as proc:
        yield proc


def test_reference_agent_does_the_work(mesh: MeshProcess, agents: Callable[..., Any]) -> None:
    owner = Owner(mesh)
    agents(mesh, owner.key, "worker")
    task = owner.create(type="echo", description="hello agents", metadata={"n": 1})
    wait_until(lambda: owner.task(task["task_id"])["status"] == "completed", 20, "completion")
    done = owner.task(task["task_id"])
    assert done["result"]["echo"] == "hello agents"
    assert done["attempt"] == 1
    assert done["assigned_agent"] == agent_id_of(owner.id, "worker")
    assert completed_events(mesh, task["task_id"]) == 1


def test_killed_agent_task_completes_elsewhere(
    mesh: MeshProcess, agents: Callable[..., Any]
) -> None:
    owner = Owner(mesh)
    first = agents(mesh, owner.key, "first")
    task = owner.create(type="sleep", description="nap", metadata={"seconds": 4})
    first_id = agent_id_of(owner.id, "first")
    wait_until(
        lambda: owner.task(task["task_id"])["assigned_agent"] == first_id,
        20,
        "the first agent to take the task",
    )
    agents(mesh, owner.key, "second")
    os.kill(first.pid, signal.SIGKILL)
    wait_until(lambda: owner.task(task["task_id"])["status"] == "completed", 30, "completion")
    done = owner.task(task["task_id"])
    assert done["attempt"] == 2
    assert done["assigned_agent"] == agent_id_of(owner.id, "second")
    assert completed_events(mesh, task["task_id"]) == 1


def test_frozen_agent_late_result_is_refused(mesh: MeshProcess, agents: Callable[..., Any]) -> None:
    owner = Owner(mesh)
    frozen = agents(mesh, owner.key, "frozen")
    task = owner.create(type="sleep", description="nap", metadata={"seconds": 2})
    frozen_id = agent_id_of(owner.id, "frozen")
    wait_until(
        lambda: owner.task(task["task_id"])["assigned_agent"] == frozen_id,
        20,
        "the agent to take the task",
    )
    os.kill(frozen.pid, signal.SIGSTOP)
    # Past its lease, the task goes to another agent.
    agents(mesh, owner.key, "healthy")
    wait_until(lambda: owner.task(task["task_id"])["status"] == "completed", 30, "completion")
    done = owner.task(task["task_id"])
    assert done["attempt"] == 2 and done["assigned_agent"] == agent_id_of(owner.id, "healthy")
    # Thawed, the first agent finishes its stale attempt and reports it: refused.
    os.kill(frozen.pid, signal.SIGCONT)
    time.sleep(5)
    assert frozen.poll() is None  # a refused result does not kill the agent
    after = owner.task(task["task_id"])
    assert after["attempt"] == 2 and after["assigned_agent"] == done["assigned_agent"]
    assert after["result"] == done["result"]
    assert completed_events(mesh, task["task_id"]) == 1


def test_every_accepted_task_finishes_across_a_mesh_restart(
    tmp_path: Path, agents: Callable[..., Any]
) -> None:
    port = free_port()
    data = tmp_path / "restart"
    with MeshProcess(data_dir=data, port=port, env=FAST) as mesh:
        owner = Owner(mesh)
        agents(mesh, owner.key, "steady", "echo", "sleep")
        ids = [
            owner.create(type="sleep", description=f"t{i}", metadata={"seconds": 0.2})["task_id"]
            for i in range(20)
        ]
        wait_until(lambda: owner.task(ids[2])["status"] == "completed", 30, "some progress")
    # The mesh is down; every task that got a 201 must still be there and finish.
    with MeshProcess(data_dir=data, port=port, env=FAST) as mesh:
        owner.mesh = mesh
        owner.login()

        def all_done() -> bool:
            return all(owner.task(i)["status"] == "completed" for i in ids)

        wait_until(all_done, 90, "every task to complete after the restart")
        for task_id in ids:
            assert completed_events(mesh, task_id) == 1


def test_seed_004_client_flow(mesh: MeshProcess, agents: Callable[..., Any]) -> None:
    """SutazAIClient's login, create_task and wait_for_task, as seed 004 writes them (on httpx
    instead of requests), against the mesh with a reference agent."""
    owner = Owner(mesh)
    agents(mesh, owner.key, "sutazai")

    class SutazAIClient:
        def __init__(self, base_url: str) -> None:
            self.base_url = base_url
            self.session = httpx.Client()

        def login(self, username: str, password: str) -> str:
            response = self.session.post(
                f"{self.base_url}/api/v1/auth/login",
                json={"username": username, "password": password},
            )
            response.raise_for_status()
            self.token = response.json()["access_token"]
            self.session.headers["Authorization"] = f"Bearer {self.token}"
            return str(self.token)

        def create_task(self, task_type: str, description: str, **kwargs: Any) -> dict[str, Any]:
            response = self.session.post(
                f"{self.base_url}/api/v1/tasks",
                json={"type": task_type, "description": description, **kwargs},
            )
            response.raise_for_status()
            return dict(response.json())

        def get_task(self, task_id: str) -> dict[str, Any]:
            response = self.session.get(f"{self.base_url}/api/v1/tasks/{task_id}")
            response.raise_for_status()
            return dict(response.json())

        def wait_for_task(self, task_id: str, timeout: int = 300) -> dict[str, Any]:
            start = time.time()
            while time.time() - start < timeout:
                task = self.get_task(task_id)
                if task["status"] in ["completed", "failed"]:
                    return task
                time.sleep(2)
            raise TimeoutError(f"Task {task_id} did not complete in {timeout} seconds")

    client = SutazAIClient(mesh.url)
    try:
        client.login(owner.user["username"], owner.user["password"])
        task = client.create_task(
            "echo", "Review authentication module", priority=8, metadata={"file": "/src/auth.py"}
        )
        result = client.wait_for_task(task["task_id"], timeout=60)
    finally:
        client.session.close()
    assert result["status"] == "completed"
    assert result["result"]["echo"] == "Review authentication module"


def test_a_stopped_agent_hands_its_task_back_at_once(
    tmp_path: Path, agents: Callable[..., Any]
) -> None:
    """SIGTERM ends the agent's side of the stream cleanly: its task is released at once, long
    before its (here 60 s) lease would run out."""
    with MeshProcess(
        data_dir=tmp_path / "slow-lease", env={**FAST, "AGENTMESH_LEASE_SECONDS": "60"}
    ) as mesh:
        owner = Owner(mesh)
        leaving = agents(mesh, owner.key, "leaving")
        task = owner.create(type="sleep", description="nap", metadata={"seconds": 3})
        leaving_id = agent_id_of(owner.id, "leaving")
        wait_until(
            lambda: owner.task(task["task_id"])["assigned_agent"] == leaving_id,
            20,
            "the agent to take the task",
        )
        leaving.send_signal(signal.SIGTERM)
        assert leaving.wait(timeout=15) == 0
        agents(mesh, owner.key, "staying")
        wait_until(
            lambda: owner.task(task["task_id"])["status"] == "completed",
            20,
            "completion, well within the lease",
        )
        done = owner.task(task["task_id"])
        assert done["attempt"] == 2 and done["assigned_agent"] == agent_id_of(owner.id, "staying")


def test_an_attempt_past_its_time_limit_is_stopped_and_fails(
    mesh: MeshProcess, agents: Callable[..., Any], tmp_path: Path
) -> None:
    """A task's timeout_seconds, through Envoy: the agent is told to stop (its one slot is
    free again at once, not after the minute its handler would take) and the task fails with
    TASK_TIMEOUT, without another attempt and without a result."""
    owner = Owner(mesh)
    refused = httpx.post(
        mesh.url + "/api/v1/tasks",
        json={"type": "echo", "description": "x", "timeout_seconds": 0},
        headers=owner.headers,
    )
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "VALIDATION_ERROR" and error["details"]["field"] == "timeout_seconds"
    assert owner.create(type="echo", description="default")["timeout_seconds"] == 3600

    agents(mesh, owner.key, "worker")  # capacity 1
    task = owner.create(
        type="sleep", description="too long", metadata={"seconds": 60}, timeout_seconds=2
    )
    assert task["timeout_seconds"] == 2
    wait_until(lambda: owner.task(task["task_id"])["status"] == "running", 20, "the sleep to run")
    wait_until(lambda: owner.task(task["task_id"])["status"] == "failed", 10, "the time limit")
    failed = owner.task(task["task_id"])
    assert failed["error_code"] == "TASK_TIMEOUT" and failed["attempt"] == 1
    assert "time limit of 2 s" in failed["error"]
    echo = owner.create(type="echo", description="after the limit")
    wait_until(lambda: owner.task(echo["task_id"])["status"] == "completed", 15, "the next task")
    assert owner.task(task["task_id"])["status"] == "failed"
    assert completed_events(mesh, task["task_id"]) == 0
    # The agent was told why, not only that its lease is gone (a heartbeat racing the sweep
    # may add a LEASE_LOST for the same attempt, which changes nothing).
    told = [
        line
        for line in (tmp_path / "agent-worker.log").read_text().splitlines()
        if "task cancelled" in line and task["task_id"] in line
    ]
    assert any('"reason": "TASK_TIMEOUT"' in line for line in told), told


def test_an_agent_shows_what_it_finished_and_its_resources(
    mesh: MeshProcess, agents: Callable[..., Any]
) -> None:
    """Seed 004's agent document: metrics from the tasks whose last attempt it ran, and the
    resource use its heartbeats report (the reference agent reports its own process)."""
    owner = Owner(mesh)
    agents(mesh, owner.key, "counted", "echo", "sleep")
    done = [owner.create(type="echo", description=f"ok {n}") for n in range(2)]
    # A sleep of "x" seconds fails (VALIDATION_ERROR, not retried).
    failed = owner.create(type="sleep", description="x", metadata={"seconds": "x"})

    def ended() -> bool:
        statuses = {owner.task(t["task_id"])["status"] for t in [*done, failed]}
        return statuses <= {"completed", "failed"}

    wait_until(ended, 20, "the tasks to end")
    assert owner.task(failed["task_id"])["status"] == "failed"
    agent_id = agent_id_of(owner.id, "counted")
    path = f"{mesh.url}/api/v1/agents/{agent_id}"
    wait_until(
        lambda: (
            httpx.get(path, headers=owner.headers)
            .json()
            .get("resources", {})
            .get("memory_usage", 0)
            > 0
        ),
        10,
        "a heartbeat with resources",
    )
    agent = httpx.get(path, headers=owner.headers).json()
    metrics = agent["metrics"]
    assert metrics["tasks_completed"] == 2
    assert metrics["success_rate"] == pytest.approx(2 / 3, abs=1e-3)
    assert metrics["error_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert 0 <= metrics["average_duration"] < 10
    resources = agent["resources"]
    assert 0 < resources["memory_usage"] < resources["memory_limit"]
    assert resources["cpu_usage"] >= 0
    listed = httpx.get(mesh.url + "/api/v1/agents", headers=owner.headers).json()["agents"]
    assert [a["metrics"] for a in listed if a["agent_id"] == agent_id] == [metrics]
