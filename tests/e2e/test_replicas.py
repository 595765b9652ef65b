"""Replicas (`agentmesh serve SERVICE` behind `agentmesh gateway`) on the machine's PostgreSQL
and Redis: each service a process of its own, two of the tasks service, and Envoy in front.
A user works through the gateway as through `agentmesh up`, an agent takes and finishes work,
the events of one process reach the event list of another, and with one tasks replica killed
the gateway sends every request to the other."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import types
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import cast

import grpc
import httpx
import pytest
import redis

from agentmesh.v1 import (
    agents_pb2,
    agents_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)
from servers.common.auth import SESSION_ENDED, TOKEN_ENDED
from servers.common.config import SERVICES
from servers.launcher import MeshProcess, free_port
from tests.conftest import SHARED_MESH_ENV, _unavailable
from tests.e2e.test_agent_registry import StreamAgent
from tests.e2e.test_http_agents import http_agent
from tests.helpers import assert_envelope, new_user

REDIS_URL = os.environ.get("AGENTMESH_TEST_REDIS", "redis://127.0.0.1:6379/0")


class Replicas:
    """The processes of one mesh: a replica of each service, two of tasks (and ``auths`` of the
    auth service, ``agents`` of the agents service), and the gateway. ``env``: more settings,
    for every process."""

    def __init__(
        self,
        data_dir: Path,
        database_url: str,
        *,
        agents: int = 1,
        auths: int = 1,
        metrics: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.ports = {
            "auth": [free_port() for _ in range(auths)],
            "tasks": [free_port(), free_port()],
            "agents": [free_port() for _ in range(agents)],
            "messaging": [free_port()],
        }
        self.public = free_port()
        self.url = f"http://127.0.0.1:{self.public}"
        self.env = {
            **os.environ,
            **SHARED_MESH_ENV,
            "AGENTMESH_DATA_DIR": str(data_dir),
            "DATABASE_URL": database_url,
            "REDIS_URL": REDIS_URL,
            "AGENTMESH_BUS_PREFIX": f"replicas-{secrets.token_hex(4)}:",
            "AGENTMESH_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            **{
                f"AGENTMESH_{name.upper()}_UPSTREAMS": ",".join(f"127.0.0.1:{p}" for p in ports)
                for name, ports in self.ports.items()
            },
            **(env or {}),
        }
        # The tasks replicas' view of the agents service.
        self.tasks_env: dict[str, str] = {}
        if agents == 1:
            # One service by name, as on a container network: Envoy resolves it (STRICT_DNS),
            # and so does the gRPC client of the services that call it.
            self.env["AGENTMESH_AGENTS_UPSTREAMS"] = f"localhost:{self.ports['agents'][0]}"
        else:
            # The tasks replicas know only the first agents replica: what reaches an agent on
            # another came over the bus.
            self.tasks_env["AGENTMESH_AGENTS_UPSTREAMS"] = f"127.0.0.1:{self.ports['agents'][0]}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # Each service process's own metrics port, by process name ("auth", "tasks-1", ...).
        self.metrics: dict[str, int] = {}
        self._with_metrics = metrics

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        env = {**self.env, **(self.tasks_env if name.startswith("tasks") else {})}
        if self._with_metrics and args[0] == "serve":
            self.metrics[name] = free_port()
            args = (*args, "--metrics-port", str(self.metrics[name]))
        with (self.data_dir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "servers.cli", *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.data_dir / f"{name}.log").read_text(errors="replace")

    def _wait(self, name: str, ready: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while ready not in self.log(name):
            assert self.procs[name].poll() is None, self.log(name)
            assert time.monotonic() < deadline, f"{name} did not start:\n{self.log(name)}"
            time.sleep(0.1)

    def start(self) -> Replicas:
        # The first replica migrates the database and writes the keys; then the others.
        self._spawn("auth", "serve", "auth", "--port", str(self.ports["auth"][0]))
        self._wait("auth", "listening on")
        for n, port in enumerate(self.ports["auth"][1:], start=1):
            self._spawn(f"auth-{n}", "serve", "auth", "--port", str(port))
        for name in ("tasks", "agents", "messaging"):
            for n, port in enumerate(self.ports[name]):
                self._spawn(f"{name}-{n}", "serve", name, "--port", str(port))
        for name in self.procs:
            self._wait(name, "listening on")
        self._spawn("gateway", "gateway", "--port", str(self.public))
        self._wait("gateway", "agentmesh gateway: http")
        deadline = time.monotonic() + 20
        while httpx.get(self.url + "/health/ready").status_code != 200:
            assert time.monotonic() < deadline, self.log("gateway")
            time.sleep(0.2)
        return self

    def stop(self) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes


@contextlib.contextmanager
def _running(mesh: Replicas) -> Iterator[Replicas]:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except (redis.RedisError, OSError) as exc:
        _unavailable("Redis on 127.0.0.1:6379", exc)
    try:
        yield mesh.start()
    finally:
        mesh.stop()


@pytest.fixture
def replicas(tmp_path: Path, postgres_url: str) -> Iterator[Replicas]:
    with _running(Replicas(tmp_path, postgres_url, metrics=True)) as mesh:
        yield mesh


@pytest.fixture
def two_agents_replicas(tmp_path: Path, postgres_url: str) -> Iterator[Replicas]:
    # Dispatchers that never poll within the test: a task reaches an idle agent by its wake-up
    # alone.
    env = {"AGENTMESH_CLAIM_POLL_SECONDS": "600"}
    with _running(Replicas(tmp_path, postgres_url, agents=2, env=env)) as mesh:
        yield mesh


@pytest.fixture
def two_auth_replicas(tmp_path: Path, postgres_url: str) -> Iterator[Replicas]:
    # Verified keys and profiles remembered far longer than the test: what an auth replica
    # forgets, it was told over Redis.
    env = {"AGENTMESH_AUTH_CACHE_SECONDS": "300"}
    with _running(Replicas(tmp_path, postgres_url, auths=2, env=env)) as mesh:
        yield mesh


@pytest.fixture
def quick_cutoffs_replicas(tmp_path: Path, postgres_url: str) -> Iterator[Replicas]:
    env = {"AGENTMESH_TOKEN_CUTOFF_POLL_SECONDS": "1"}
    with _running(Replicas(tmp_path, postgres_url, env=env)) as mesh:
        yield mesh


def _signed_in(mesh: Replicas, role: str) -> dict[str, str]:
    """The bearer of a new user that `agentmesh grant-role` gave ``role``."""
    user = new_user()
    assert httpx.post(mesh.url + "/api/v1/auth/register", json=user).status_code == 201
    subprocess.run(
        [sys.executable, "-m", "servers.cli", "grant-role", user["username"], role],
        env=mesh.env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    login = httpx.post(
        mesh.url + "/api/v1/auth/login",
        json={"username": user["username"], "password": user["password"]},
    )
    assert login.status_code == 200, login.text
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


def _developer(mesh: Replicas) -> dict[str, str]:
    return _signed_in(mesh, "developer")


# Besides its public service, the services whose calls a process may count.
INTERNAL_OF = {
    "agentmesh.v1.AuthService": {
        "agentmesh.v1.AuthInternalService",
        "agentmesh.v1.UsersService",
        "agentmesh.v1.HealthService",
    },
    "agentmesh.v1.TasksService": {
        "agentmesh.v1.TasksInternalService",
        "agentmesh.v1.MetricsService",
        "agentmesh.v1.HealthService",
    },
    "agentmesh.v1.AgentsService": {
        "agentmesh.v1.AgentsInternalService",
        "agentmesh.v1.HealthService",
    },
    "agentmesh.v1.EventsService": {
        "agentmesh.v1.MessagingService",
        "agentmesh.v1.HealthService",
    },
}


def _creates(mesh: Replicas, headers: dict[str, str], count: int, **task: object) -> list[str]:
    ids = []
    with httpx.Client(base_url=mesh.url, timeout=10) as client:
        for n in range(count):
            body = {"description": f"task {n}", **task}
            reply = client.post("/api/v1/tasks", json=body, headers=headers)
            assert reply.status_code == 201, reply.text
            ids.append(reply.json()["task_id"])
    return ids


async def test_replicas_behind_the_gateway_serve_the_whole_api(replicas: Replicas) -> None:
    mesh = replicas
    dev = _developer(mesh)
    created = _creates(mesh, dev, 10)
    # Envoy spread the creates over both tasks replicas.
    for n in range(2):
        assert "/agentmesh.v1.TasksService/CreateTask" in mesh.log(f"tasks-{n}")

    # An agent on the agents replica, through the gateway, takes work both replicas took in.
    key = httpx.post(
        mesh.url + "/api/v1/auth/api-keys",
        json={"name": "worker", "scopes": ["agent"]},
        headers=dev,
    )
    assert key.status_code == 201, key.text
    capability = f"replica_{secrets.token_hex(4)}"
    gateway = cast(MeshProcess, mesh)  # StreamAgent needs its url only
    agent = StreamAgent(gateway, key.json()["key"], "worker", capability, capacity=4)
    try:
        await agent.next("welcome")
        work = _creates(mesh, dev, 4, type=capability)
        # Room for all four: they come at once (StreamAgent.next skips other frames).
        held = [(await agent.next("assignment")).assignment for _ in work]
        assert {h.task.task_id for h in held} == set(work)
        for assignment in held:
            result = agents_pb2.TaskResult(
                task_id=assignment.task.task_id, attempt_token=assignment.attempt_token
            )
            result.result.update({"ok": True})
            agent.send(agents_pb2.ConnectRequest(result=result))
        acks = [(await agent.next("result_ack")).result_ack for _ in work]
        assert all(ack.accepted and ack.status == "completed" for ack in acks)
    finally:
        await agent.close()
    for task_id in work:
        task = httpx.get(f"{mesh.url}/api/v1/tasks/{task_id}", headers=dev).json()
        assert (task["status"], task["result"]) == ("completed", {"ok": True})

    # The tasks replicas' events, on Redis, reach the messaging replica's list.
    deadline = time.monotonic() + 10
    while True:
        events = httpx.get(
            mesh.url + "/api/v1/events",
            params={"patterns": "task.completed", "limit": 100},
            headers=dev,
        ).json()
        if {e["subject_id"] for e in events["events"]} >= set(work):
            break
        assert time.monotonic() < deadline, events
        await asyncio.sleep(0.2)

    # Every process answers its own metrics to a scraper: its own calls, which GET /metrics
    # through the gateway (one tasks replica) would never show.
    viewer = _signed_in(mesh, "viewer")
    served = {
        "auth": "agentmesh.v1.AuthService",
        "tasks-0": "agentmesh.v1.TasksService",
        "tasks-1": "agentmesh.v1.TasksService",
        "agents-0": "agentmesh.v1.AgentsService",
        "messaging-0": "agentmesh.v1.EventsService",
    }
    assert set(mesh.metrics) == set(served)
    for name, service in served.items():
        url = f"http://127.0.0.1:{mesh.metrics[name]}/metrics"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers=dev).status_code == 403  # a developer reads no metrics
        reply = httpx.get(url, headers=viewer)
        assert reply.status_code == 200, (name, reply.text)
        calls = {
            line.split('grpc_service="')[1].split('"')[0]
            for line in reply.text.splitlines()
            if line.startswith("agentmesh_grpc_server_handled_total{")
        }
        own = {service, *INTERNAL_OF[service], "grpc.health.v1.Health"}  # Envoy's checks
        assert service in calls and calls <= own, (name, calls)
        # Tasks by status, mesh-wide, read at the scrape where the tasks service runs.
        assert ('agentmesh_tasks{status="completed"}' in reply.text) == name.startswith("tasks")

    # One tasks replica dies: every request goes to the other, none fails.
    mesh.procs["tasks-0"].kill()
    mesh.procs["tasks-0"].wait()
    more = _creates(mesh, dev, 10)
    listed = httpx.get(mesh.url + "/api/v1/tasks", params={"limit": 100}, headers=dev).json()
    assert {t["task_id"] for t in listed["tasks"]} == set(created + work + more)

    codes = mesh.stop()
    assert codes.pop("tasks-0") == -signal.SIGKILL
    assert codes == dict.fromkeys(codes, 0), {n: mesh.log(n)[-2000:] for n in codes}


async def test_an_agent_is_reached_on_whichever_agents_replica_holds_it(
    two_agents_replicas: Replicas,
) -> None:
    """The tasks replicas tell agents-0, and REST reaches agents-0; the agent is connected to
    agents-1. Its work, the cancellation, the new configuration and the news that it connected
    elsewhere all reach it over Redis."""
    mesh = two_agents_replicas
    dev = _developer(mesh)
    key = httpx.post(
        mesh.url + "/api/v1/auth/api-keys",
        json={"name": "worker", "scopes": ["agent"]},
        headers=dev,
    )
    assert key.status_code == 201, key.text
    near, far = (f"http://127.0.0.1:{port}" for port in mesh.ports["agents"])
    capability = f"replica_{secrets.token_hex(4)}"
    agent = StreamAgent(_at(far), key.json()["key"], "far", capability)
    twin: StreamAgent | None = None
    try:
        welcome = (await agent.next("welcome")).welcome
        [task_id] = _creates(mesh, dev, 1, type=capability)
        assignment = (await agent.next("assignment")).assignment
        assert assignment.task.task_id == task_id

        reply = httpx.delete(f"{mesh.url}/api/v1/tasks/{task_id}", headers=dev)
        assert reply.status_code == 200, reply.text
        cancellation = (await agent.next("cancellation")).cancellation
        assert (cancellation.task_id, cancellation.reason, cancellation.attempt_token) == (
            task_id,
            "CANCELLED",
            assignment.attempt_token,
        )

        async with grpc.aio.insecure_channel(near.removeprefix("http://")) as channel:
            request = agents_pb2.UpdateAgentConfigRequest(agent_id=welcome.agent_id)
            request.configuration.update({"temperature": 0.1})
            request.update_mask.paths.append("temperature")
            await agents_pb2_grpc.AgentsServiceStub(channel).UpdateAgentConfig(
                request, metadata=(("authorization", dev["Authorization"]),), timeout=10
            )
        update = (await agent.next("config_update")).config_update
        assert dict(update.configuration) == {"model": "small", "temperature": 0.1}
        assert list(update.updated_fields) == ["temperature"]

        twin = StreamAgent(_at(near), key.json()["key"], "far", capability)
        assert (await twin.next("welcome")).welcome.agent_id == welcome.agent_id
        assert (await agent.next("end")).end.reason == "REPLACED"
    finally:
        await agent.close()
        if twin is not None:
            await twin.close()

    # An HTTP agent through the gateway: its calls all reach the replica that holds its
    # stream, which therefore sees each task end and hands it the next one.
    http_capability = f"replica_http_{secrets.token_hex(4)}"
    async with http_agent(mesh.url, key.json()["key"]) as worker:
        await worker.register("http-worker", [http_capability], max_capacity=1)
        stream = await worker.stream()
        for n in range(4):
            [task_id] = _creates(mesh, dev, 1, type=http_capability)
            assignment = await stream.next("assignment")
            assert assignment["task"]["task_id"] == task_id, n
            reply = await worker.complete(assignment, result={"n": n})
            assert reply.status_code == 200, reply.text
            assert (
                httpx.get(f"{mesh.url}/api/v1/tasks/{task_id}", headers=dev).json()["status"]
                == "completed"
            )
    codes = mesh.stop()
    assert codes == dict.fromkeys(codes, 0), {n: mesh.log(n)[-2000:] for n in codes}


async def test_what_one_auth_replica_changes_the_other_forgets_at_once(
    two_auth_replicas: Replicas,
) -> None:
    """An API key is verified (and remembered) by auth-1; revoked through auth-0, it is refused
    by auth-1 at once, although auth-1 would remember it for 300 s. The same for a role granted
    by `agentmesh grant-role` straight in the database."""
    mesh = two_auth_replicas
    dev = _developer(mesh)
    near, far = (f"127.0.0.1:{port}" for port in mesh.ports["auth"])
    async with (
        grpc.aio.insecure_channel(near) as near_channel,
        grpc.aio.insecure_channel(far) as far_channel,
    ):
        revoker = auth_pb2_grpc.AuthServiceStub(near_channel)
        checker = auth_pb2_grpc.AuthServiceStub(far_channel)
        bearer = (("authorization", dev["Authorization"]),)

        async def me(key: str) -> auth_pb2.User:
            reply = await checker.GetMe(
                auth_pb2.GetMeRequest(), metadata=(("x-api-key", key),), timeout=10
            )
            return reply.user

        async def until(check: Callable[[], Awaitable[bool]]) -> None:
            deadline = time.monotonic() + 3  # far below the 300 s the entry is remembered
            while not await check():
                assert time.monotonic() < deadline, "auth-1 was not told"
                await asyncio.sleep(0.05)

        keys = []
        for name in ("revoked", "kept"):
            created = await revoker.CreateApiKey(
                auth_pb2.CreateApiKeyRequest(name=name, scopes=["agent"]),
                metadata=bearer,
                timeout=10,
            )
            keys.append((created.api_key.key_id, created.key))
        (revoked_id, revoked), (_, kept) = keys
        profile = await me(revoked)
        assert "admin" not in profile.roles
        await me(kept)

        await revoker.RevokeApiKey(
            auth_pb2.RevokeApiKeyRequest(key_id=revoked_id), metadata=bearer, timeout=10
        )

        async def refused() -> bool:
            try:
                await me(revoked)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
                return True
            return False

        await until(refused)
        assert (await me(kept)).id == profile.id  # the other key of the account still works

        subprocess.run(
            [sys.executable, "-m", "servers.cli", "grant-role", profile.username, "admin"],
            env=mesh.env,
            check=True,
            capture_output=True,
            timeout=60,
        )

        async def granted() -> bool:
            return "admin" in (await me(kept)).roles

        await until(granted)
    codes = mesh.stop()
    assert codes == dict.fromkeys(codes, 0), {n: mesh.log(n)[-2000:] for n in codes}


async def _until_refused(
    stubs: list[tasks_pb2_grpc.TasksServiceStub], bearer: str, message: str, deadline: float
) -> None:
    """Each tasks replica refuses the access token with ``message`` before ``deadline``."""
    for stub in stubs:
        while True:
            try:
                await stub.ListTasks(
                    tasks_pb2.ListTasksRequest(),
                    metadata=(("authorization", bearer),),
                    timeout=10,
                )
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
                assert exc.details() == message, exc
                break
            assert time.monotonic() < deadline, "a tasks replica still takes the token"
            await asyncio.sleep(0.1)


async def test_a_disable_or_a_sign_out_through_the_auth_replica_is_refused_by_every_other(
    quick_cutoffs_replicas: Replicas,
) -> None:
    """The tasks replicas, and the messaging one, never see the disable or the sign-out: each
    learns from the auth service within its poll (1 s here) that the token no longer holds."""
    mesh = quick_cutoffs_replicas
    admin, user = _signed_in(mesh, "admin"), _signed_in(mesh, "user")
    with httpx.Client(base_url=mesh.url, timeout=10) as client:
        me = client.get("/api/v1/auth/me", headers=user)
        assert me.status_code == 200, me.text
        user_id = me.json()["user"]["id"]
        assert client.get("/api/v1/events", headers=user).status_code == 200
        leaving = client.post("/api/v1/auth/register", json=new_user())
        assert leaving.status_code == 201, leaving.text
    session = leaving.json()
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in mesh.ports["tasks"]]
    try:
        stubs = [tasks_pb2_grpc.TasksServiceStub(c) for c in channels]
        for bearer in (user["Authorization"], f"Bearer {session['access_token']}"):
            for stub in stubs:
                await stub.ListTasks(
                    tasks_pb2.ListTasksRequest(),
                    metadata=(("authorization", bearer),),
                    timeout=10,
                )
        with httpx.Client(base_url=mesh.url, timeout=10) as client:
            off = client.put(f"/api/v1/users/{user_id}", json={"disabled": True}, headers=admin)
            assert off.status_code == 200, off.text
            out = client.post(
                "/api/v1/auth/logout",
                json={"refresh_token": session["refresh_token"]},
                headers={"Authorization": f"Bearer {session['access_token']}"},
            )
            assert out.status_code == 200, out.text
        deadline = time.monotonic() + 5
        await _until_refused(stubs, user["Authorization"], TOKEN_ENDED, deadline)
        await _until_refused(stubs, f"Bearer {session['access_token']}", SESSION_ENDED, deadline)
    finally:
        for channel in channels:
            await channel.close()
    with httpx.Client(base_url=mesh.url, timeout=10) as client:
        while client.get("/api/v1/events", headers=user).status_code != 401:
            assert time.monotonic() < deadline, "the messaging replica still takes the token"
            time.sleep(0.1)
        assert_envelope(client.get("/api/v1/events", headers=user), 401, "AUTH_REQUIRED")
    codes = mesh.stop()
    assert codes == dict.fromkeys(codes, 0), {n: mesh.log(n)[-2000:] for n in codes}


def _at(url: str) -> MeshProcess:
    """Where StreamAgent connects: one server's own port rather than the gateway."""
    return cast(MeshProcess, types.SimpleNamespace(url=url))


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["serve", "tasks"], {"DATABASE_URL": ""}, "PostgreSQL"),
        (["serve", "tasks"], {"REDIS_URL": ""}, "set REDIS_URL"),
        (["serve", "tasks"], {"AGENTMESH_AGENTS_UPSTREAMS": ""}, "AGENTMESH_AGENTS_UPSTREAMS"),
        (["gateway"], {"AGENTMESH_AUTH_UPSTREAMS": ""}, "AGENTMESH_AUTH_UPSTREAMS"),
        (["gateway"], {}, "start them first"),
        (["serve", "tasks"], {"AGENTMESH_AUTH_UPSTREAMS": "auth_1:1"}, "is not IPv4:PORT"),
    ],
)
def test_what_replicas_need_is_said_before_they_start(
    tmp_path: Path, args: list[str], env: dict[str, str], says: str
) -> None:
    base = {
        **os.environ,
        "AGENTMESH_DATA_DIR": str(tmp_path),
        "DATABASE_URL": "postgresql+asyncpg://nobody@127.0.0.1:1/none",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        **{f"AGENTMESH_{n.upper()}_UPSTREAMS": "127.0.0.1:1" for n in SERVICES},
    }
    done = subprocess.run(
        [sys.executable, "-m", "servers.cli", *args],
        env={k: v for k, v in {**base, **env}.items() if v},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0 and says in done.stderr, done.stderr


def test_a_tasks_replica_stopping_under_load_fails_no_request(replicas: Replicas) -> None:
    """A rolling restart: SIGTERM to one of two tasks replicas while eight clients create
    tasks through the gateway. Every create is answered 201: a call the stopping replica no
    longer takes (its port refuses, or its HTTP/2 connection refuses the stream) goes to the
    other, and the calls it already took finish within its grace period."""
    mesh = replicas
    dev = _developer(mesh)
    answers: list[tuple[str, int | str]] = []  # (idempotency key, status or transport error)
    stop = threading.Event()

    def creator() -> None:
        with httpx.Client(base_url=mesh.url, timeout=10) as client:
            while not stop.is_set():
                key = uuid.uuid4().hex
                body = {"description": "through a rolling restart", "idempotency_key": key}
                try:
                    reply = client.post("/api/v1/tasks", json=body, headers=dev)
                except httpx.TransportError as exc:
                    answers.append((key, type(exc).__name__))
                    continue
                answers.append((key, reply.status_code if reply.status_code == 201 else reply.text))

    threads = [threading.Thread(target=creator) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        while sum(status == 201 for _, status in answers) < 50:
            time.sleep(0.05)
        mesh.procs["tasks-0"].send_signal(signal.SIGTERM)
        assert mesh.procs["tasks-0"].wait(20) == 0, mesh.log("tasks-0")[-2000:]
        served = len(answers)
        while len(answers) < served + 50:  # the other replica serves on
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    failed = [status for _, status in answers if status != 201]
    assert not failed, (len(answers), sorted({str(f)[40:400] for f in failed}))
    listed = httpx.get(mesh.url + "/api/v1/tasks", params={"limit": 1}, headers=dev).json()
    assert listed["total"] == len(answers)
