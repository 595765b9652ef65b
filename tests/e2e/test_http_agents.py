"""Agents that speak only HTTP, through Envoy with httpx alone: RegisterAgent, the
StreamAssignments SSE stream, Heartbeat, ReportProgress and CompleteTask get them what a Connect
agent gets (assignments, leases, cancellations, configuration updates, refused stale results)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from servers.agents.work import agent_id_of
from servers.launcher import MeshProcess, free_port
from tests.conftest import SHARED_MESH_ENV
from tests.e2e.test_agents import FAST
from tests.helpers import assert_envelope, grant_role, new_user

Json = dict[str, Any]


class Developer:
    """A developer (user token for tasks and agents) with an agent-scoped API key."""

    def __init__(self, mesh: MeshProcess, database_url: str | None = None) -> None:
        self.url = mesh.url
        user = new_user()
        assert httpx.post(self.url + "/api/v1/auth/register", json=user).status_code == 201
        grant_role(mesh, user["username"], "developer", database_url)
        reply = httpx.post(
            self.url + "/api/v1/auth/login",
            json={"username": user["username"], "password": user["password"]},
        )
        assert reply.status_code == 200, reply.text
        self.headers = {"Authorization": f"Bearer {reply.json()['access_token']}"}
        self.id = str(reply.json()["user"]["id"])
        self.key = self.new_key()

    def new_key(self) -> str:
        reply = httpx.post(
            self.url + "/api/v1/auth/api-keys",
            json={"name": "http-workers", "scopes": ["agent"]},
            headers=self.headers,
        )
        assert reply.status_code == 201, reply.text
        return str(reply.json()["key"])

    def create(self, **task: object) -> Json:
        reply = httpx.post(self.url + "/api/v1/tasks", json=task, headers=self.headers)
        assert reply.status_code == 201, reply.text
        return dict(reply.json())

    def task(self, task_id: str) -> Json:
        reply = httpx.get(f"{self.url}/api/v1/tasks/{task_id}", headers=self.headers)
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def agent(self, agent_id: str) -> Json:
        reply = httpx.get(f"{self.url}/api/v1/agents/{agent_id}", headers=self.headers)
        assert reply.status_code == 200, reply.text
        return dict(reply.json())


class Stream:
    """One StreamAssignments SSE stream, read in the background into (event, data) pairs."""

    def __init__(self, client: httpx.AsyncClient, agent_id: str) -> None:
        self._client = client
        self._path = f"/api/v1/agents/{agent_id}/assignments/stream"
        self.events: asyncio.Queue[tuple[str, Json]] = asyncio.Queue()
        self.status = 0
        self._open = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async with self._client.stream("GET", self._path) as reply:
                self.status = reply.status_code
                if reply.status_code == 200:
                    assert reply.headers["content-type"].startswith("text/event-stream")
                self._open.set()
                event, data = "", ""
                async for line in reply.aiter_lines():
                    if line.startswith("event: "):
                        event = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        data = line.removeprefix("data: ")
                    elif not line and event:
                        await self.events.put((event, json.loads(data)))
                        event = ""
        finally:
            self._open.set()
            await self.events.put(("closed", {}))

    async def opened(self) -> int:
        await asyncio.wait_for(self._open.wait(), 10)
        return self.status

    async def next(self, kind: str, timeout: float = 10) -> Json:
        """The data of the next event of this kind; pings and other kinds are skipped."""
        async with asyncio.timeout(timeout):
            while True:
                event, data = await self.events.get()
                if event == kind:
                    return data
                assert event != "closed", f"the stream closed while waiting for {kind}"

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


class HttpAgent:
    """An agent that speaks only HTTP, with an optional heartbeat loop listing its tasks."""

    def __init__(self, url: str, key: str) -> None:
        self.client = httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(10, read=60),
        )
        self.agent_id = ""
        self.holding: set[str] = set()
        self._beats: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._streams: list[Stream] = []

    async def register(self, name: str, capabilities: list[str], **fields: object) -> Json:
        reply = await self.client.post(
            "/api/v1/agents/register", json={"name": name, "capabilities": capabilities, **fields}
        )
        assert reply.status_code in (200, 201), reply.text
        self.agent_id = reply.json()["agent"]["agent_id"]
        return {"status": reply.status_code, **reply.json()}

    async def stream(self) -> Stream:
        stream = Stream(self.client, self.agent_id)
        self._streams.append(stream)
        assert await stream.opened() == 200
        assert (await stream.next("config_update"))["updated_fields"] == []
        return stream

    def path(self, task_id: str, what: str) -> str:
        return f"/api/v1/agents/{self.agent_id}/tasks/{task_id}/{what}"

    async def heartbeat(self, task_ids: list[str]) -> httpx.Response:
        return await self.client.post(
            f"/api/v1/agents/{self.agent_id}/heartbeat",
            json={"current_load": len(task_ids), "task_ids": task_ids},
        )

    async def progress(self, assignment: Json, progress: int) -> httpx.Response:
        return await self.client.post(
            self.path(assignment["task"]["task_id"], "progress"),
            json={"attempt_token": assignment["attempt_token"], "progress": progress},
        )

    async def complete(self, assignment: Json, **outcome: object) -> httpx.Response:
        return await self.client.post(
            self.path(assignment["task"]["task_id"], "complete"),
            json={"attempt_token": assignment["attempt_token"], **outcome},
        )

    def beat(self, every: float) -> None:
        async def loop() -> None:
            while not self._stop.is_set():
                reply = await self.heartbeat(sorted(self.holding))
                assert reply.status_code == 200, reply.text
                self.holding -= set(reply.json()["lost_task_ids"])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), every)

        self._stop.clear()
        self._beats = asyncio.ensure_future(loop())

    async def stop_beating(self) -> None:
        """Stops after the heartbeat in flight: a cancelled call would still count as heard
        from, without renewing anything."""
        if self._beats is not None:
            self._stop.set()
            await asyncio.gather(self._beats, return_exceptions=True)

    async def close(self) -> None:
        await self.stop_beating()
        for stream in self._streams:
            await stream.close()
        await self.client.aclose()


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


@contextlib.asynccontextmanager
async def http_agent(url: str, key: str) -> Any:
    agent = HttpAgent(url, key)
    try:
        yield agent
    finally:
        await agent.close()


def capability() -> str:
    """A task type no other test queues: agents serve every owner's tasks on a shared mesh."""
    return f"http_{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def fast_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    """Heartbeats every 2 s and leases of 3 s: a silent agent gets no new work after 3 s (one
    and a half intervals), loses its lease after 3 to 4 s (the sweep runs every second), and
    its stream ends after 6 s (three intervals), so the order of the three is certain."""
    env = {**FAST, "AGENTMESH_HEARTBEAT_SECONDS": "2", "AGENTMESH_LEASE_SECONDS": "3"}
    with MeshProcess(data_dir=Path(tmp_path_factory.mktemp("fast")), env=env) as proc:
        yield proc


async def test_an_http_agent_does_the_work(
    request: pytest.FixtureRequest, any_mesh: MeshProcess, mesh: MeshProcess
) -> None:
    url = None if any_mesh is mesh else str(request.getfixturevalue("postgres_url"))
    dev = Developer(any_mesh, url)
    kind = capability()
    async with http_agent(any_mesh.url, dev.key) as agent:
        first = await agent.register(
            "translator", [kind], type="specialist", max_capacity=2, version="1.0",
            configuration={"model": "small"},
        )  # fmt: skip
        assert first["status"] == 201
        assert first["agent"]["agent_id"] == agent_id_of(dev.id, "translator")
        assert first["agent"]["status"] == "idle" and first["agent"]["max_capacity"] == 2
        assert first["agent"]["configuration"] == {"model": "small"}
        assert (first["heartbeat_interval_seconds"], first["lease_duration_seconds"]) == (10, 30)
        again = await agent.register("translator", [kind], max_capacity=2)
        assert again["status"] == 200 and again["agent"]["agent_id"] == agent.agent_id

        stream = await agent.stream()
        sent = time.time()
        task = dev.create(type=kind, description="bonjour", metadata={"to": "de"})
        assignment = await stream.next("assignment")
        assert assignment["task"]["task_id"] == task["task_id"]
        assert assignment["task"]["metadata"] == {"to": "de"} and assignment["attempt"] == 1
        assert dev.agent(agent.agent_id)["status"] == "active"
        # Nothing to estimate from before the agent reports progress.
        assert "estimated_completion" not in dev.task(task["task_id"])

        await asyncio.sleep(1.0)
        reply = await agent.progress(assignment, 40)
        reported = time.time()
        assert reply.status_code == 200, reply.text
        running = dev.task(task["task_id"])
        assert running["status"] == "running"
        # 40 percent took the second or so since the lease: the rest, 1.5 times that, is to come.
        ahead = _epoch(running["estimated_completion"]) - _epoch(running["started_at"])
        assert 1.5 <= ahead <= 1.5 * (reported - sent) + 0.01, running
        beat = await agent.heartbeat([task["task_id"], "not-a-task"])
        assert beat.status_code == 200, beat.text
        assert beat.json()["renewed_task_ids"] == [task["task_id"]]
        assert beat.json()["lost_task_ids"] == ["not-a-task"]
        assert beat.json()["lease_expires_at"] > assignment["lease_expires_at"]

        done = await agent.complete(assignment, result={"text": "hallo"})
        assert done.status_code == 200, done.text
        assert done.json() == {"task_id": task["task_id"], "status": "completed"}
        # Safe to retry: the same attempt's outcome answers the same.
        assert (await agent.complete(assignment, result={"text": "hallo"})).json() == done.json()
        finished = dev.task(task["task_id"])
        assert finished["status"] == "completed" and finished["result"] == {"text": "hallo"}
        assert "estimated_completion" not in finished
        assert finished["assigned_agent"] == agent.agent_id
        seen = dev.agent(agent.agent_id)
        assert seen["status"] == "idle" and seen["health"]["status"] == "healthy"

        # An error outcome: not retryable, so the task fails with its code.
        failing = dev.create(type=kind, description="unknown language")
        assignment = await stream.next("assignment")
        assert assignment["task"]["task_id"] == failing["task_id"]
        error = {"code": "VALIDATION_ERROR", "message": "no such language", "retryable": False}
        reply = await agent.complete(assignment, error=error)
        assert reply.json() == {"task_id": failing["task_id"], "status": "failed"}
        assert dev.task(failing["task_id"])["error_code"] == "VALIDATION_ERROR"


async def test_a_second_stream_replaces_the_first_and_repeats_the_held_work(
    mesh: MeshProcess,
) -> None:
    dev = Developer(mesh)
    kind = capability()
    async with http_agent(mesh.url, dev.key) as agent:
        await agent.register("repeater", [kind])
        first = await agent.stream()
        task = dev.create(type=kind, description="held across streams")
        held = await first.next("assignment")
        second = await agent.stream()
        assert (await first.next("end"))["reason"] == "REPLACED"
        # The work the agent holds comes first, with its attempt token unchanged.
        again = await second.next("assignment")
        assert again["task"]["task_id"] == task["task_id"]
        assert again["attempt_token"] == held["attempt_token"]
        reply = await agent.complete(again, result={"ok": True})
        assert reply.json()["status"] == "completed", reply.text


async def test_an_outcome_refills_its_slot_once_and_only_while_a_stream_is_open(
    mesh: MeshProcess,
) -> None:
    """Completing a task hands the agent its next one in the same step, oldest first. The
    same outcome sent again (a retry after a lost answer) hands out nothing more, and with no
    stream open nothing is handed out at all: the agent would never see it."""
    dev = Developer(mesh)
    kind = capability()
    async with http_agent(mesh.url, dev.key) as agent:
        await agent.register("refiller", [kind], max_capacity=1)
        stream = await agent.stream()
        first = dev.create(type=kind, description="one")
        held = await stream.next("assignment")
        assert held["task"]["task_id"] == first["task_id"]
        second = dev.create(type=kind, description="two")
        third = dev.create(type=kind, description="three")

        done = await agent.complete(held, result={"n": 1})
        assert done.json() == {"task_id": first["task_id"], "status": "completed"}, done.text
        following = await stream.next("assignment")
        assert following["task"]["task_id"] == second["task_id"]
        again = await agent.complete(held, result={"n": 1})
        assert again.json() == done.json()
        assert dev.task(third["task_id"])["status"] == "queued"

        await stream.close()
        await asyncio.sleep(1)  # Envoy and the mesh see the stream go
        last = await agent.complete(following, result={"n": 2})
        assert last.json()["status"] == "completed", last.text
        await asyncio.sleep(0.5)
        assert dev.task(third["task_id"])["status"] == "queued"
        assert dev.agent(agent.agent_id)["status"] == "idle"


async def test_the_same_outcome_twice_at_once_refills_the_slot_once(mesh: MeshProcess) -> None:
    """An HTTP agent sends its outcome again before the first call has answered (a client
    retry): both are in the mesh at once, the database being busy. Both answer the outcome,
    one next task is handed out, the other stays queued, and the agent never holds more than
    its capacity."""
    dev = Developer(mesh)
    kind = capability()
    async with http_agent(mesh.url, dev.key) as agent:
        await agent.register("retrier", [kind], max_capacity=1)
        stream = await agent.stream()
        first = dev.create(type=kind, description="one")
        held = await stream.next("assignment")
        second = dev.create(type=kind, description="two")
        third = dev.create(type=kind, description="three")
        db = mesh.data_dir / "agentmesh.db"
        with contextlib.closing(sqlite3.connect(db, timeout=10, isolation_level=None)) as lock:
            lock.execute("BEGIN IMMEDIATE")  # the mesh's writes wait behind this
            calls = [asyncio.ensure_future(agent.complete(held, result={"n": 1})) for _ in "ab"]
            await asyncio.sleep(0.5)  # both calls are in the mesh, waiting
            lock.execute("ROLLBACK")
        replies = await asyncio.gather(*calls)
        expected = {"task_id": first["task_id"], "status": "completed"}
        assert [r.json() for r in replies] == [expected, expected], [r.text for r in replies]
        following = await stream.next("assignment")
        assert following["task"]["task_id"] == second["task_id"]
        await asyncio.sleep(0.5)
        assert dev.task(third["task_id"])["status"] == "queued"
        assert dev.agent(agent.agent_id)["current_load"] == 1


async def test_cancellations_and_configuration_reach_the_stream(mesh: MeshProcess) -> None:
    dev = Developer(mesh)
    kind = capability()
    async with http_agent(mesh.url, dev.key) as agent:
        await agent.register("cancellable", [kind], configuration={"model": "small"})
        stream = await agent.stream()
        task = dev.create(type=kind, description="to be cancelled")
        assignment = await stream.next("assignment")
        cancelled = httpx.delete(f"{mesh.url}/api/v1/tasks/{task['task_id']}", headers=dev.headers)
        assert cancelled.status_code == 200, cancelled.text
        cancellation = await stream.next("cancellation")
        assert cancellation == {
            "task_id": task["task_id"],
            "reason": "CANCELLED",
            "attempt_token": assignment["attempt_token"],
            "message": "",  # a stopper's words; a cancel has none
        }
        # The cancelled attempt's reports are refused, with the state that refuses them.
        refused = assert_envelope(await agent.progress(assignment, 90), 409, "CONFLICT")
        assert refused["details"] == {"task_id": task["task_id"], "status": "cancelled"}
        late = assert_envelope(
            await agent.complete(assignment, result={"late": 1}), 409, "CONFLICT"
        )
        assert late["details"] == {"task_id": task["task_id"], "status": "cancelled"}
        assert dev.task(task["task_id"])["status"] == "cancelled"

        patched = httpx.patch(
            f"{mesh.url}/api/v1/agents/{agent.agent_id}/config",
            json={"temperature": 0.5},
            headers=dev.headers,
        )
        assert patched.status_code == 200, patched.text
        update = await stream.next("config_update")
        assert update == {
            "configuration": {"model": "small", "temperature": 0.5},
            "updated_fields": ["temperature"],
        }
        # A new stream opens with the effective configuration.
        reopened = Stream(agent.client, agent.agent_id)
        try:
            assert await reopened.opened() == 200
            opening = await reopened.next("config_update")
            assert opening["configuration"] == {"model": "small", "temperature": 0.5}
        finally:
            await reopened.close()


async def test_only_the_key_that_registered_an_agent_acts_as_it(mesh: MeshProcess) -> None:
    dev = Developer(mesh)
    kind = capability()
    async with http_agent(mesh.url, dev.key) as agent:
        await agent.register("mine", [kind])
        stream = await agent.stream()
        task = dev.create(type=kind, description="only mine")
        assignment = await stream.next("assignment")
        others = [Developer(mesh).key, dev.new_key()]  # another owner; the same owner
        for key in others:
            async with http_agent(mesh.url, key) as intruder:
                intruder.agent_id = agent.agent_id
                assert_envelope(await intruder.heartbeat([]), 404, "NOT_FOUND")
                assert_envelope(await intruder.progress(assignment, 10), 404, "NOT_FOUND")
                reply = await intruder.complete(assignment, result={"stolen": True})
                assert_envelope(reply, 404, "NOT_FOUND")
                path = f"/api/v1/agents/{agent.agent_id}/assignments/stream"
                assert_envelope(await intruder.client.get(path), 404, "NOT_FOUND")
        unknown = agent_id_of(dev.id, "never-registered")
        reply = await agent.client.post(f"/api/v1/agents/{unknown}/heartbeat", json={})
        assert_envelope(reply, 404, "NOT_FOUND")
        # A person's token is not an agent's key.
        reply = httpx.post(
            f"{mesh.url}/api/v1/agents/{agent.agent_id}/heartbeat", json={}, headers=dev.headers
        )
        assert_envelope(reply, 403, "INSUFFICIENT_PERMISSIONS")
        # An unknown task (a task of another owner's is a 409: the attempt is not this one's).
        missing = {"task": {"task_id": "no-such-task"}, "attempt_token": "t"}
        assert_envelope(await agent.complete(missing, result={}), 404, "TASK_NOT_FOUND")
        assert (await agent.complete(assignment, result={"mine": True})).status_code == 200
        assert dev.task(task["task_id"])["result"] == {"mine": True}


async def test_invalid_requests_are_400_envelopes(mesh: MeshProcess) -> None:
    dev = Developer(mesh)
    async with http_agent(mesh.url, dev.key) as agent:
        bad_registrations: list[Json] = [
            {"capabilities": ["x"]},
            {"name": "n" * 65, "capabilities": ["x"]},
            {"name": "no-capabilities", "capabilities": []},
            {"name": "too-many", "capabilities": [f"c{i}" for i in range(33)]},
            {"name": "long-capability", "capabilities": ["c" * 65]},
            {"name": "too-big", "capabilities": ["x"], "max_capacity": 1001},
            {"name": "negative", "capabilities": ["x"], "max_capacity": -1},
            {"name": "long-type", "capabilities": ["x"], "type": "t" * 65},
            {"name": "huge-config", "capabilities": ["x"], "configuration": {"a": "b" * 70000}},
        ]
        for body in bad_registrations:
            reply = await agent.client.post("/api/v1/agents/register", json=body)
            assert_envelope(reply, 400, "VALIDATION_ERROR")
        # Names and labels are shown in listings: nothing that hides or reorders text, or
        # writes to a terminal. A capability is a task type, or it could never match a task.
        unreadable: list[tuple[Json, str]] = [
            ({"name": "w\u202e1", "capabilities": ["x"]}, "name"),  # a bidi override
            ({"name": "w\u200b", "capabilities": ["x"]}, "name"),  # a zero-width space
            ({"name": "w\x1b[2J", "capabilities": ["x"]}, "name"),  # clears a terminal
            ({"name": "   ", "capabilities": ["x"]}, "name"),  # blank in every listing
            ({"name": "ok", "capabilities": ["code review"]}, "capabilities"),
            ({"name": "ok", "capabilities": ["echo\n"]}, "capabilities"),
            ({"name": "ok", "capabilities": ["x"], "type": "t\u2066"}, "type"),
            ({"name": "ok", "capabilities": ["x"], "version": "1\r"}, "version"),
        ]
        for body, field in unreadable:
            reply = await agent.client.post("/api/v1/agents/register", json=body)
            error = assert_envelope(reply, 400, "VALIDATION_ERROR")
            assert error["details"] == {"field": field}, error
        await agent.register("valid", [capability()])
        beat = f"/api/v1/agents/{agent.agent_id}/heartbeat"
        for body in (
            {"current_load": -1},
            {"current_load": 1001},
            {"task_ids": ["t"] * 1001},
            {"task_ids": [""]},
            {"resources": {"cpu_usage": -1}},
        ):
            assert_envelope(await agent.client.post(beat, json=body), 400, "VALIDATION_ERROR")
        task = {"task": {"task_id": "some-task"}, "attempt_token": "token"}
        for progress in (-1, 101):
            assert_envelope(await agent.progress(task, progress), 400, "VALIDATION_ERROR")
        reply = await agent.client.post(
            agent.path("some-task", "progress"), json={"attempt_token": "", "progress": 1}
        )
        assert_envelope(reply, 400, "VALIDATION_ERROR")
        reply = await agent.client.post(
            agent.path("some-task", "progress"),
            json={"attempt_token": "token", "progress": 1, "message": "m" * 501},
        )
        assert_envelope(reply, 400, "VALIDATION_ERROR")
        for outcome in (
            {},
            {"result": {"a": 1}, "error": {"code": "X", "message": "both"}},
            {"error": {"code": "lower_case", "message": "bad code"}},
            {"error": {"code": "ENDS_A_LINE\n", "message": "bad code"}},
            {"error": {"code": "NO_MESSAGE", "message": ""}},
            {"error": {"code": "LONG", "message": "m" * 2001}},
        ):
            assert_envelope(await agent.complete(task, **outcome), 400, "VALIDATION_ERROR")


async def test_an_agent_that_stops_heartbeating_loses_its_task(fast_mesh: MeshProcess) -> None:
    dev = Developer(fast_mesh)
    kind = capability()
    async with (
        http_agent(fast_mesh.url, dev.key) as frozen,
        http_agent(fast_mesh.url, dev.key) as healthy,
    ):
        await frozen.register("frozen", [kind])
        frozen_stream = await frozen.stream()
        frozen.beat(0.5)
        task = dev.create(type=kind, description="outlives a lease")
        first = await frozen_stream.next("assignment")
        frozen.holding.add(task["task_id"])
        # Heartbeats renew the 3 s lease: past it, the task is still this attempt's.
        await asyncio.sleep(3.5)
        kept = dev.task(task["task_id"])
        assert (kept["status"], kept["attempt"]) == ("assigned", 1)
        assert kept["assigned_agent"] == frozen.agent_id

        await healthy.register("healthy", [kind])
        healthy.beat(0.5)
        healthy_stream = await healthy.stream()
        await frozen.stop_beating()
        # The lease runs out: the frozen agent is told, and the other agent gets attempt 2.
        lost = await frozen_stream.next("cancellation")
        assert (lost["task_id"], lost["reason"]) == (task["task_id"], "LEASE_LOST")
        second = await healthy_stream.next("assignment", timeout=15)
        assert second["task"]["task_id"] == task["task_id"] and second["attempt"] == 2
        healthy.holding.add(task["task_id"])
        # Silent for three intervals, the frozen agent's stream ends; with no stream open and
        # nothing heard, it goes offline.
        assert (await frozen_stream.next("error"))["code"] == "HEARTBEAT_TIMEOUT"
        for _ in range(50):
            if dev.agent(frozen.agent_id)["status"] == "offline":
                break
            await asyncio.sleep(0.1)
        assert dev.agent(frozen.agent_id)["status"] == "offline"

        # It wakes up and reports its stale attempt: refused, but it is online again.
        assert_envelope(await frozen.complete(first, result={"late": True}), 409, "CONFLICT")
        assert dev.agent(frozen.agent_id)["status"] == "idle"
        reply = await healthy.complete(second, result={"on": "time"})
        assert reply.json()["status"] == "completed", reply.text
        done = dev.task(task["task_id"])
        assert done["result"] == {"on": "time"} and done["assigned_agent"] == healthy.agent_id
        # The first attempt's LEASE_EXPIRED does not describe the task that completed.
        assert (done["error"], done["error_code"]) == ("", "")


async def test_an_owner_registers_at_most_its_limit_of_agents(tmp_path: Path) -> None:
    """A worker's default name changes with its pid, and every listing reads all of an
    owner's agents: the number one user may register is bounded, over REST and on Connect."""
    from tests.e2e.test_agent_registry import StreamAgent

    env = {**FAST, "AGENTMESH_AGENTS_PER_OWNER": "2"}
    with MeshProcess(data_dir=tmp_path, env=env) as mesh:
        dev = Developer(mesh)
        async with http_agent(mesh.url, dev.key) as agent:
            for name in ("first", "second", "first"):  # registering again is no new agent
                await agent.register(name, ["x"])
            reply = await agent.client.post(
                "/api/v1/agents/register", json={"name": "third", "capabilities": ["x"]}
            )
            error = assert_envelope(reply, 429, "AGENT_LIMIT_REACHED")
            assert error["details"] == {"max_agents": "2"}
        stream = StreamAgent(mesh, dev.key, "third-on-a-stream")
        try:
            refused = (await stream.next("error")).error
            assert refused.code == "AGENT_LIMIT_REACHED"
        finally:
            await stream.close()
        # Another user has a limit of its own.
        async with http_agent(mesh.url, Developer(mesh).key) as other:
            await other.register("third", ["x"])


async def test_revoking_the_key_ends_the_assignment_stream(fast_mesh: MeshProcess) -> None:
    """The SSE stream is checked like a Connect one: its key again every heartbeat interval
    (2 s here); revoked, the stream ends with the refusal, and the key's REST calls are
    refused as they always were."""
    dev = Developer(fast_mesh)
    keys = httpx.get(fast_mesh.url + "/api/v1/auth/api-keys", headers=dev.headers).json()
    key_id = next(k["key_id"] for k in keys["api_keys"] if k["name"] == "http-workers")
    async with http_agent(fast_mesh.url, dev.key) as agent:
        await agent.register("revoked-http", [capability()])
        stream = await agent.stream()
        reply = httpx.delete(f"{fast_mesh.url}/api/v1/auth/api-keys/{key_id}", headers=dev.headers)
        assert reply.status_code == 200, reply.text
        ended = await stream.next("error", timeout=10)
        assert ended["code"] == "AUTH_REQUIRED" and "revoked" in ended["message"]
        assert (await agent.heartbeat([])).status_code == 401


async def test_after_a_restart_an_http_agents_held_work_comes_first_and_fills_its_slots(
    tmp_path: Path,
) -> None:
    """The mesh restarts while an HTTP agent holds a task (its lease still running): the
    agent's next stream repeats the task first, with its attempt token, and the task counts
    against the agent's capacity: a task queued meanwhile waits for the slot."""
    port = free_port()
    with MeshProcess(data_dir=tmp_path, port=port, env=SHARED_MESH_ENV) as mesh:
        dev = Developer(mesh)
        kind = capability()
        async with http_agent(mesh.url, dev.key) as agent:
            await agent.register("survivor", [kind], max_capacity=1)
            stream = await agent.stream()
            task = dev.create(type=kind, description="held across a restart")
            held = await stream.next("assignment")
    with MeshProcess(data_dir=tmp_path, port=port, env=SHARED_MESH_ENV) as mesh:
        waiting = dev.create(type=kind, description="queued while the slot is taken")
        async with http_agent(mesh.url, dev.key) as agent:
            agent.agent_id = agent_id_of(dev.id, "survivor")  # not registered again
            stream = await agent.stream()
            again = await stream.next("assignment")
            assert again["task"]["task_id"] == task["task_id"]
            assert again["attempt_token"] == held["attempt_token"]
            # The one slot is taken: nothing more until the held task is done.
            with pytest.raises(TimeoutError):
                await stream.next("assignment", timeout=2)
            reply = await agent.complete(again, result={"ok": True})
            assert reply.json()["status"] == "completed", reply.text
            after = await stream.next("assignment")
            assert after["task"]["task_id"] == waiting["task_id"]
