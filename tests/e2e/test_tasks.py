"""TasksService end to end, as protos/agentmesh/v1/tasks.proto promises it: create, list, get,
result, cancel, start, stop and stats over REST through Envoy (seed 004's /api/v1 paths and seed
001's deprecated /api aliases) and over gRPC, straight to the tasks server and through Envoy.

No agent runs in these meshes, so no task is ever assigned: tasks stay `created` or `queued`
until they are cancelled or stopped.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2

from agentmesh.v1 import tasks_pb2, tasks_pb2_grpc
from servers.launcher import MeshProcess, free_port
from tests.helpers import Account, assert_envelope, error_reason, grant_role, new_user
from tests.helpers import register as _register
from tests.helpers import relogin as _login

Grant = Callable[[str, str], None]
Body = dict[str, Any]

# Fields the server may recompute on every read (an estimate), left out of "unchanged" checks.
VOLATILE = {"estimated_completion"}

# How a state conflict may be said over gRPC (docs/errors.md: CONFLICT is ABORTED or
# ALREADY_EXISTS).
GRPC_CONFLICT = {grpc.StatusCode.ABORTED, grpc.StatusCode.ALREADY_EXISTS}


def _create(client: httpx.Client, who: Account, **fields: Any) -> Body:
    body: Body = {"description": "do the thing", **fields}
    reply = client.post("/api/v1/tasks", json=body, headers=who.headers)
    assert reply.status_code == 201, reply.text
    task = reply.json()
    assert isinstance(task, dict)
    return task


def _get(client: httpx.Client, who: Account, task_id: str) -> Body:
    reply = client.get(f"/api/v1/tasks/{task_id}", headers=who.headers)
    assert reply.status_code == 200, reply.text
    task = reply.json()
    assert isinstance(task, dict)
    return task


def _list(client: httpx.Client, who: Account, **params: Any) -> Body:
    reply = client.get("/api/v1/tasks", params=params, headers=who.headers)
    assert reply.status_code == 200, reply.text
    page = reply.json()
    assert isinstance(page, dict)
    return page


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _recent(value: str) -> bool:
    return abs((datetime.now(UTC) - _when(value)).total_seconds()) < 60


def _stable(task: Body) -> Body:
    return {k: v for k, v in task.items() if k not in VOLATILE}


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


@pytest.fixture(scope="module")
def admin(mesh: MeshProcess) -> Account:
    """One admin on the SQLite `mesh` for this module's tests."""
    with httpx.Client(base_url=mesh.url) as client:
        account = _register(client)
        grant_role(mesh, account.username, "admin")
        return _login(client, account)


@pytest.fixture
def any_grant(request: pytest.FixtureRequest, any_mesh: MeshProcess, mesh: MeshProcess) -> Grant:
    """Grants a role on `any_mesh`, whichever database it runs on."""
    url = None if any_mesh is mesh else str(request.getfixturevalue("postgres_url"))
    return lambda login, role: grant_role(any_mesh, login, role, url)


def test_create_task_answers_the_whole_task(any_mesh: MeshProcess) -> None:
    with httpx.Client(base_url=any_mesh.url) as client:
        owner = _register(client)
        reply = client.post(
            "/api/v1/tasks",
            json={
                "type": "code_review",
                "description": "Review the authentication module",
                "priority": 8,
                "metadata": {"file": "/src/auth.py", "rules": ["security"], "depth": 2},
            },
            headers=owner.headers,
        )
        assert reply.status_code == 201, reply.text
        assert "x-api-deprecation-date" not in reply.headers
        task = reply.json()
        assert task["task_id"]
        assert task["id"] == task["task_id"]  # seed 001's deprecated alias
        assert task["status"] == "queued"
        assert task["type"] == "code_review"
        assert task["description"] == "Review the authentication module"
        assert task["priority"] == 8
        assert task["priority_label"] == "high"
        assert task["metadata"] == {"file": "/src/auth.py", "rules": ["security"], "depth": 2}
        assert task["owner_id"] == owner.id
        assert task["attempt"] == 0
        assert task["max_attempts"] == 3
        assert task["progress"] == 0
        assert not task["assigned_agent"]
        assert _recent(task["created_at"]) and _recent(task["updated_at"])
        assert _when(task["updated_at"]) >= _when(task["created_at"])

        # GET answers the same document.
        assert _stable(_get(client, owner, task["task_id"])) == _stable(task)

        # Only a description is required: type "general", priority 5 ("medium").
        bare = _create(client, owner, description="just this")
        assert bare["type"] == "general"
        assert bare["priority"] == 5 and bare["priority_label"] == "medium"
        assert bare["status"] == "queued" and bare["max_attempts"] == 3
        assert bare["task_id"] != task["task_id"]

        # Every optional field is kept as sent.
        full = _create(
            client,
            owner,
            type="analysis",
            title="Analyze",
            description="full form",
            model="gpt-oss-120b",
            required_capabilities=["python", "security"],
            max_attempts=5,
            callback_url="https://example.com/hooks/tasks",
        )
        again = _get(client, owner, full["task_id"])
        assert again["title"] == "Analyze" and again["model"] == "gpt-oss-120b"
        assert again["required_capabilities"] == ["python", "security"]
        assert again["max_attempts"] == 5
        assert again["callback_url"] == "https://example.com/hooks/tasks"


def test_priority_numbers_and_words(mesh: MeshProcess) -> None:
    with httpx.Client(base_url=mesh.url) as client:
        owner = _register(client)
        # Seed 001's words set the number...
        for word, number in (("low", 2), ("medium", 5), ("high", 8), ("critical", 10)):
            task = _create(client, owner, priority_label=word)
            assert (task["priority"], task["priority_label"]) == (number, word)
        # ...and every number has its word.
        for number, word in ((1, "low"), (3, "low"), (4, "medium"), (6, "medium"), (7, "high")):
            task = _create(client, owner, priority=number)
            assert (task["priority"], task["priority_label"]) == (number, word)
        for number in (9, 10):
            assert _create(client, owner, priority=number)["priority_label"] == "critical"
        # Both given and agreeing is fine.
        agreed = _create(client, owner, priority=8, priority_label="high")
        assert (agreed["priority"], agreed["priority_label"]) == (8, "high")


def test_seed_001_task_flow(mesh: MeshProcess) -> None:
    with httpx.Client(base_url=mesh.url) as client:
        owner = _register(client)
        created = client.post(
            "/api/tasks",
            json={
                "title": "Analyze",
                "description": "Scan the repository for vulnerabilities",
                "model": "gpt-oss-120b",
                "priority_label": "high",
            },
            headers=owner.headers,
        )
        assert created.status_code == 201, created.text
        assert created.headers["x-api-deprecation-date"]
        assert "/api/v1/tasks" in created.headers["x-api-deprecation-info"]
        task = created.json()
        task_id = task["task_id"]
        assert task["id"] == task_id
        assert task["priority"] == 8 and task["priority_label"] == "high"
        assert task["title"] == "Analyze" and task["model"] == "gpt-oss-120b"
        assert task["status"] == "queued"

        got = client.get(f"/api/tasks/{task_id}", headers=owner.headers)
        assert got.status_code == 200, got.text
        assert got.headers["x-api-deprecation-date"]
        assert got.json()["id"] == task_id
        listed = client.get("/api/tasks", headers=owner.headers)
        assert listed.status_code == 200, listed.text
        assert listed.headers["x-api-deprecation-date"]
        assert [t["id"] for t in listed.json()["tasks"]] == [task_id]

        # Seed 001 clients always call start, without a body; a queued task stays queued.
        started = client.post(f"/api/tasks/{task_id}/start", headers=owner.headers)
        assert started.status_code == 200, started.text
        assert started.headers["x-api-deprecation-date"]
        assert started.json()["status"] == "started"
        assert started.json()["task"]["status"] == "queued"
        stopped = client.post(f"/api/tasks/{task_id}/stop", headers=owner.headers)
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["status"] == "stopped"
        assert _get(client, owner, task_id)["status"] == "stopped"

        # Seed 001 put the word in "priority", a number field: refused, nothing created.
        word = client.post(
            "/api/tasks",
            json={"title": "Analyze", "description": "x", "priority": "high"},
            headers=owner.headers,
        )
        assert_envelope(word, 400, "VALIDATION_ERROR")
        assert _list(client, owner)["total"] == 1


def test_deferred_task_waits_for_start(any_mesh: MeshProcess) -> None:
    with httpx.Client(base_url=any_mesh.url) as client:
        owner = _register(client)
        task = _create(client, owner, defer_start=True)
        assert task["status"] == "created"
        assert _get(client, owner, task["task_id"])["status"] == "created"

        url = f"/api/v1/tasks/{task['task_id']}/start"
        started = client.post(url, json={}, headers=owner.headers)
        assert started.status_code == 200, started.text
        assert started.json()["status"] == "started"
        assert started.json()["task"]["task_id"] == task["task_id"]
        assert started.json()["task"]["status"] == "queued"
        now = _get(client, owner, task["task_id"])
        assert now["status"] == "queued"

        # Starting again changes nothing and answers the same.
        again = client.post(url, json={}, headers=owner.headers)
        assert again.status_code == 200, again.text
        assert again.json()["status"] == "started"
        assert _stable(again.json()["task"]) == _stable(now)
        assert _stable(_get(client, owner, task["task_id"])) == _stable(now)


def test_invalid_tasks_are_validation_errors(mesh: MeshProcess) -> None:
    ok: Body = {"type": "code_review", "description": "fine"}
    cases: list[Body] = [
        {"type": "code_review"},  # no description
        {**ok, "description": ""},
        {**ok, "priority": 11},
        {**ok, "priority": -1},
        {**ok, "priority_label": "urgent"},
        {**ok, "priority": 2, "priority_label": "high"},  # disagreeing
        {**ok, "max_attempts": 11},
        {**ok, "max_attempts": -1},
        {**ok, "metadata": {"blob": "x" * 70_000}},  # over 64 KiB
        {**ok, "callback_url": "ftp://x"},
        {**ok, "callback_url": "not a url"},
        # URLs no delivery could use: each refused at create, not failed for an hour later.
        {**ok, "callback_url": "http://[::1/hook"},
        {**ok, "callback_url": "http://example.com:99999/hook"},
        {**ok, "callback_url": "http://exa mple.com/hook"},
        {**ok, "callback_url": "http://example.com/\nhook"},
        {**ok, "callback_url": "http://a..b/hook"},
        {**ok, "title": "t" * 201},
        {**ok, "description": "d" * 100_001},
    ]
    with httpx.Client(base_url=mesh.url) as client:
        owner = _register(client)
        for body in cases:
            reply = client.post("/api/v1/tasks", json=body, headers=owner.headers)
            error = assert_envelope(reply, 400, "VALIDATION_ERROR")
            if "callback_url" in body:
                assert error["details"] == {"field": "callback_url"}, error
        # None of them created anything.
        assert _list(client, owner)["total"] == 0

        for params in ({"status": "bogus"}, {"limit": 101}, {"limit": -1}, {"offset": -1}):
            reply = client.get("/api/v1/tasks", params=params, headers=owner.headers)
            assert_envelope(reply, 400, "VALIDATION_ERROR")
        # The deepest page says how deep a page may be, not that the offset is negative.
        deep = client.get("/api/v1/tasks", params={"offset": 10**8}, headers=owner.headers)
        error = assert_envelope(deep, 400, "VALIDATION_ERROR")
        assert error["message"] == "offset must be between 0 and 1000000", error


def test_zero_priority_and_max_attempts_are_refused(mesh: MeshProcess) -> None:
    """Priority is 1..10 and max_attempts 1..10 (CreateTaskRequest): an explicit 0 is outside
    both ranges and must be refused, not taken as "omitted". The server can only tell the two
    apart when the fields track presence (`optional int32` in tasks.proto)."""
    with httpx.Client(base_url=mesh.url) as client:
        owner = _register(client)
        for body in (
            {"description": "x", "priority": 0},
            {"description": "x", "max_attempts": 0},
        ):
            reply = client.post("/api/v1/tasks", json=body, headers=owner.headers)
            assert_envelope(reply, 400, "VALIDATION_ERROR")


def test_idempotency_key_answers_the_first_task(any_mesh: MeshProcess) -> None:
    with httpx.Client(base_url=any_mesh.url) as client:
        owner = _register(client)
        other = _register(client)
        key = f"idem-{uuid.uuid4()}"
        body = {"description": "first", "priority_label": "high", "idempotency_key": key}
        first = _create(client, owner, **body)
        assert first["idempotency_key"] == key
        assert _list(client, owner)["total"] == 1

        # The same request again (a client retrying): the first task, 200 instead of 201,
        # also when its fields are spelled as the contract reads them alike (8 is "high").
        for retry in (body, {**body, "priority_label": "", "priority": 8}):
            repeat = client.post("/api/v1/tasks", json=retry, headers=owner.headers)
            assert repeat.status_code == 200, repeat.text
            assert repeat.json()["task_id"] == first["task_id"]

        # The key with other fields is another request: refused, naming the key's task, and
        # nothing is created (answering the first task would say the second one exists).
        for changed in ({"description": "second"}, {"priority": 7}, {"metadata": {"n": 1}}):
            reused = client.post("/api/v1/tasks", json={**body, **changed}, headers=owner.headers)
            error = assert_envelope(reused, 409, "IDEMPOTENCY_KEY_REUSED")
            assert error["details"] == {"field": "idempotency_key", "task_id": first["task_id"]}
        assert _get(client, owner, first["task_id"])["description"] == "first"
        assert _list(client, owner)["total"] == 1

        # Another owner's key is another task, whatever the fields.
        theirs = _create(client, other, description="theirs", idempotency_key=key)
        assert theirs["task_id"] != first["task_id"]
        assert theirs["owner_id"] == other.id
        assert _list(client, owner)["total"] == 1
        assert _list(client, other)["total"] == 1


def test_other_users_tasks_are_not_found(any_mesh: MeshProcess, any_grant: Grant) -> None:
    with httpx.Client(base_url=any_mesh.url) as client:
        owner = _register(client)
        stranger = _register(client)
        task = _create(client, owner, description="mine")
        task_id = task["task_id"]

        def answers(who: Account, tid: str) -> list[httpx.Response]:
            base = f"/api/v1/tasks/{tid}"
            return [
                client.get(base, headers=who.headers),
                client.get(f"/api/tasks/{tid}", headers=who.headers),
                client.get(f"{base}/result", headers=who.headers),
                client.delete(base, headers=who.headers),
                client.post(f"{base}/start", json={}, headers=who.headers),
                client.post(f"{base}/stop", json={}, headers=who.headers),
            ]

        # Another user's task looks exactly like one that does not exist.
        for tid in (task_id, str(uuid.uuid4()), "task_does-not-exist"):
            for reply in answers(stranger, tid):
                assert_envelope(reply, 404, "TASK_NOT_FOUND")
        for reply in answers(owner, str(uuid.uuid4())):
            assert_envelope(reply, 404, "TASK_NOT_FOUND")
        assert _list(client, stranger)["total"] == 0

        # Nothing the stranger tried touched it.
        assert _stable(_get(client, owner, task_id)) == _stable(task)

        # An admin sees every task.
        boss = _register(client)
        any_grant(boss.username, "admin")
        boss = _login(client, boss)
        seen = _get(client, boss, task_id)
        assert seen["task_id"] == task_id and seen["owner_id"] == owner.id


def test_a_page_larger_than_the_edges_buffers_is_served_whole(mesh: MeshProcess) -> None:
    """Envoy transcodes a unary response whole; with its 32 KiB per-connection buffer as the
    limit, a page of tasks with some metadata was a 500 INTERNAL_ERROR. (Past 1 MiB a page
    stops early: test_sizes.py.)"""
    with httpx.Client(base_url=mesh.url, timeout=30) as client:
        owner = _register(client)
        blob = "m" * 45_000
        for n in range(20):
            _create(client, owner, description=f"big {n}", metadata={"blob": blob})
        page = client.get("/api/v1/tasks", params={"limit": 20}, headers=owner.headers)
        assert page.status_code == 200, page.text[:300]
        assert len(page.content) > 900_000
        tasks = page.json()["tasks"]
        assert len(tasks) == 20 and {t["metadata"]["blob"] for t in tasks} == {blob}


def test_list_is_the_callers_newest_first_filtered_and_paged(any_mesh: MeshProcess) -> None:
    with httpx.Client(base_url=any_mesh.url) as client:
        owner = _register(client)
        other = _register(client)
        _create(client, other, description="someone else's")
        oldest = _create(client, owner, description="one")
        middle = _create(client, owner, description="two", defer_start=True)
        newest = _create(client, owner, description="three")
        cancelled = client.delete(f"/api/v1/tasks/{oldest['task_id']}", headers=owner.headers)
        assert cancelled.status_code == 200, cancelled.text
        order = [newest["task_id"], middle["task_id"], oldest["task_id"]]

        page = _list(client, owner)
        assert [t["task_id"] for t in page["tasks"]] == order
        assert page["total"] == 3 and page["limit"] == 50 and page["offset"] == 0
        assert page["has_more"] is False
        assert all(t["owner_id"] == owner.id for t in page["tasks"])
        assert [t["status"] for t in page["tasks"]] == ["queued", "created", "cancelled"]

        def ids(status: str) -> list[str]:
            filtered = _list(client, owner, status=status)
            assert filtered["total"] == len(filtered["tasks"])
            return [t["task_id"] for t in filtered["tasks"]]

        assert ids("queued") == [newest["task_id"]]
        assert ids("created") == [middle["task_id"]]
        assert ids("cancelled") == [oldest["task_id"]]
        assert ids("pending") == [newest["task_id"], middle["task_id"]]  # seed 004's word
        assert ids("processing") == []
        assert ids("running") == [] and ids("completed") == []

        window = _list(client, owner, limit=1, offset=1)
        assert [t["task_id"] for t in window["tasks"]] == [middle["task_id"]]
        assert window["total"] == 3 and window["limit"] == 1 and window["offset"] == 1
        assert window["has_more"] is True
        last = _list(client, owner, limit=1, offset=2)
        assert [t["task_id"] for t in last["tasks"]] == [oldest["task_id"]]
        assert last["has_more"] is False
        beyond = _list(client, owner, offset=3)
        assert beyond["tasks"] == [] and beyond["total"] == 3 and beyond["has_more"] is False


def test_cancel_and_stop(any_mesh: MeshProcess) -> None:
    with httpx.Client(base_url=any_mesh.url) as client:
        owner = _register(client)
        task = _create(client, owner)
        url = f"/api/v1/tasks/{task['task_id']}"

        cancelled = client.delete(url, headers=owner.headers)
        assert cancelled.status_code == 200, cancelled.text
        body = cancelled.json()
        assert body["task_id"] == task["task_id"]
        assert body["status"] == "cancelled"
        assert _recent(body["cancelled_at"])
        assert _when(body["cancelled_at"]) >= _when(task["created_at"])
        # Cancelling again answers the same, unchanged.
        again = client.delete(url, headers=owner.headers)
        assert again.status_code == 200, again.text
        assert _stable(again.json()) == _stable(body)
        assert _stable(_get(client, owner, task["task_id"])) == _stable(body)
        # A cancelled task has ended: it can be neither started nor stopped.
        assert_envelope(
            client.post(f"{url}/start", json={}, headers=owner.headers), 409, "CONFLICT"
        )
        assert_envelope(client.post(f"{url}/stop", json={}, headers=owner.headers), 409, "CONFLICT")
        assert _get(client, owner, task["task_id"])["status"] == "cancelled"

        # Stopping a queued task ends it `stopped`.
        other = _create(client, owner)
        other_url = f"/api/v1/tasks/{other['task_id']}"
        stopped = client.post(f"{other_url}/stop", json={}, headers=owner.headers)
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["status"] == "stopped"
        assert stopped.json()["task"]["status"] == "stopped"
        assert _recent(stopped.json()["task"]["cancelled_at"])
        now = _get(client, owner, other["task_id"])
        assert now["status"] == "stopped"
        # Stopping again answers the same.
        restop = client.post(f"{other_url}/stop", json={}, headers=owner.headers)
        assert restop.status_code == 200, restop.text
        assert restop.json()["status"] == "stopped"
        assert _stable(restop.json()["task"]) == _stable(now)
        # A stopped task has ended otherwise: neither cancelled nor started.
        assert_envelope(client.delete(other_url, headers=owner.headers), 409, "CONFLICT")
        assert_envelope(
            client.post(f"{other_url}/start", json={}, headers=owner.headers), 409, "CONFLICT"
        )
        assert _stable(_get(client, owner, other["task_id"])) == _stable(now)

        # A created (never started) task can be cancelled too.
        waiting = _create(client, owner, defer_start=True)
        gone = client.delete(f"/api/v1/tasks/{waiting['task_id']}", headers=owner.headers)
        assert gone.status_code == 200, gone.text
        assert gone.json()["status"] == "cancelled"


def test_result_of_an_unfinished_task_is_a_conflict(mesh: MeshProcess) -> None:
    with httpx.Client(base_url=mesh.url) as client:
        owner = _register(client)
        queued = _create(client, owner)
        waiting = _create(client, owner, defer_start=True)
        for task, status in ((queued, "queued"), (waiting, "created")):
            reply = client.get(f"/api/v1/tasks/{task['task_id']}/result", headers=owner.headers)
            error = assert_envelope(reply, 409, "CONFLICT")
            assert error["details"] == {"status": status}


def test_a_stopped_or_cancelled_task_says_it_has_no_result(mesh: MeshProcess) -> None:
    """Ended without an outcome: still 409, but a client polling for the result is told it
    will never come."""
    with httpx.Client(base_url=mesh.url) as client:
        owner = _register(client)
        stopped, cancelled = _create(client, owner), _create(client, owner)
        url = "/api/v1/tasks/{}"
        client.post(url.format(stopped["task_id"]) + "/stop", json={}, headers=owner.headers)
        client.delete(url.format(cancelled["task_id"]), headers=owner.headers)
        for task, status in ((stopped, "stopped"), (cancelled, "cancelled")):
            reply = client.get(url.format(task["task_id"]) + "/result", headers=owner.headers)
            error = assert_envelope(reply, 409, "CONFLICT")
            assert error["details"] == {"status": status}
            assert error["message"] == f"the task ended {status}: it has no result"


def test_size_limits_count_the_bytes_of_utf8_json(mesh: MeshProcess) -> None:
    """64 KiB of metadata is 64 KiB of UTF-8 JSON: 12,000 CJK characters (36,000 bytes) fit,
    though as \\u escapes they would be 72,000; 22,000 of them (66,000 bytes) do not."""
    with httpx.Client(base_url=mesh.url) as client:
        owner = _register(client)
        fits = client.post(
            "/api/v1/tasks",
            json={"description": "cjk", "metadata": {"k": "日" * 12_000}},
            headers=owner.headers,
        )
        assert fits.status_code == 201, fits.text
        assert fits.json()["metadata"] == {"k": "日" * 12_000}
        over = client.post(
            "/api/v1/tasks",
            json={"description": "cjk", "metadata": {"k": "日" * 22_000}},
            headers=owner.headers,
        )
        assert_envelope(over, 400, "VALIDATION_ERROR")


def test_stats_count_the_callers_tasks(any_mesh: MeshProcess) -> None:
    with httpx.Client(base_url=any_mesh.url) as client:
        owner = _register(client)
        other = _register(client)
        _create(client, other)  # not the owner's: not counted
        empty = client.get("/api/v1/stats", headers=owner.headers)
        assert empty.status_code == 200, empty.text
        assert empty.json() == {
            "total_tasks": 0,
            "active_tasks": 0,
            "completed_tasks": 0,
            "failed_tasks": 0,
            "average_completion_time": 0,
            "success_rate": 0,
        }

        _create(client, owner)
        _create(client, owner)
        doomed = _create(client, owner)
        gone = client.delete(f"/api/v1/tasks/{doomed['task_id']}", headers=owner.headers)
        assert gone.status_code == 200, gone.text
        expected = {
            "total_tasks": 3,
            "active_tasks": 2,
            "completed_tasks": 0,
            "failed_tasks": 0,
            "average_completion_time": 0,
            "success_rate": 0,
        }
        for path in ("/api/v1/stats", "/api/stats"):
            reply = client.get(path, headers=owner.headers)
            assert reply.status_code == 200, reply.text
            assert reply.json() == expected, path
        assert client.get("/api/stats", headers=owner.headers).headers["x-api-deprecation-date"]

        # A task waiting for StartTask counts, but is not active (queued, assigned, running).
        _create(client, owner, defer_start=True)
        stats = client.get("/api/v1/stats", headers=owner.headers).json()
        assert stats["total_tasks"] == 4 and stats["active_tasks"] == 2


def test_viewer_reads_but_cannot_change_tasks(mesh: MeshProcess, admin: Account) -> None:
    with httpx.Client(base_url=mesh.url) as client:
        account = _register(client)
        task = _create(client, account)  # made while still a plain user
        demoted = client.put(
            f"/api/v1/users/{account.id}/roles", json={"roles": ["viewer"]}, headers=admin.headers
        )
        assert demoted.status_code == 200, demoted.text
        viewer = _login(client, account)
        url = f"/api/v1/tasks/{task['task_id']}"

        for reply in (
            client.post("/api/v1/tasks", json={"description": "x"}, headers=viewer.headers),
            client.post("/api/tasks", json={"description": "x"}, headers=viewer.headers),
            client.delete(url, headers=viewer.headers),
            client.post(f"{url}/start", json={}, headers=viewer.headers),
            client.post(f"{url}/stop", json={}, headers=viewer.headers),
        ):
            assert_envelope(reply, 403, "INSUFFICIENT_PERMISSIONS")

        listed = _list(client, viewer)
        assert [t["task_id"] for t in listed["tasks"]] == [task["task_id"]]
        assert _get(client, viewer, task["task_id"])["status"] == "queued"
        stats = client.get("/api/v1/stats", headers=viewer.headers)
        assert stats.status_code == 200, stats.text
        assert stats.json()["total_tasks"] == 1


def test_tasks_need_a_token(mesh: MeshProcess) -> None:
    some = f"/api/v1/tasks/{uuid.uuid4()}"
    with httpx.Client(base_url=mesh.url) as client:
        for reply in (
            client.post("/api/v1/tasks", json={"description": "x"}),
            client.post("/api/tasks", json={"description": "x"}),
            client.get("/api/v1/tasks"),
            client.get("/api/tasks"),
            client.get(some),
            client.get(f"{some}/result"),
            client.delete(some),
            client.post(f"{some}/start", json={}),
            client.post(f"{some}/stop", json={}),
            client.get("/api/v1/stats"),
            client.get("/api/stats"),
            client.get("/api/v1/tasks", headers={"Authorization": "Bearer abc.def.ghi"}),
        ):
            assert_envelope(reply, 401, "AUTH_REQUIRED")


@pytest.fixture(params=["direct", "envoy"])
def tasks_address(request: pytest.FixtureRequest, mesh: MeshProcess) -> Iterator[str]:
    """The tasks service straight on its port, and through Envoy's public listener."""
    if request.param == "direct":
        yield mesh.services["tasks"]
    else:
        yield mesh.url.removeprefix("http://")


def test_grpc_parity(mesh: MeshProcess, tasks_address: str) -> None:
    with httpx.Client(base_url=mesh.url) as client:
        owner = _register(client)
        stranger = _register(client)
    stub = tasks_pb2_grpc.TasksServiceStub(grpc.insecure_channel(tasks_address))
    md = owner.metadata

    task = stub.CreateTask(
        tasks_pb2.CreateTaskRequest(
            type="code_review",
            description="Review auth module",
            priority=8,
            metadata=_struct({"file": "/src/auth.py"}),
        ),
        metadata=md,
        timeout=10,
    )
    assert task.task_id and task.id == task.task_id
    assert task.status == "queued" and task.type == "code_review"
    assert task.priority == 8 and task.priority_label == "high"
    assert dict(task.metadata) == {"file": "/src/auth.py"}
    assert task.owner_id == owner.id and task.max_attempts == 3 and task.attempt == 0
    assert task.created_at.seconds > 0

    got = stub.GetTask(tasks_pb2.GetTaskRequest(task_id=task.task_id), metadata=md, timeout=10)
    assert got.task_id == task.task_id and got.description == "Review auth module"
    # The same task over REST.
    with httpx.Client(base_url=mesh.url) as client:
        assert _get(client, owner, task.task_id)["priority"] == 8

    # Another user's task, and one that does not exist: NOT_FOUND, TASK_NOT_FOUND.
    for who, tid in ((stranger, task.task_id), (owner, str(uuid.uuid4()))):
        with pytest.raises(grpc.RpcError) as err:
            stub.GetTask(tasks_pb2.GetTaskRequest(task_id=tid), metadata=who.metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(err.value) == "TASK_NOT_FOUND"

    # Bad input: INVALID_ARGUMENT, VALIDATION_ERROR.
    for bad in (
        tasks_pb2.CreateTaskRequest(description="x", priority=11),
        tasks_pb2.CreateTaskRequest(type="code_review"),
        tasks_pb2.CreateTaskRequest(description="x", priority_label="urgent"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateTask(bad, metadata=md, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(err.value) == "VALIDATION_ERROR"

    # No token: UNAUTHENTICATED, AUTH_REQUIRED.
    with pytest.raises(grpc.RpcError) as err:
        stub.ListTasks(tasks_pb2.ListTasksRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    if tasks_address == mesh.services["tasks"]:
        assert error_reason(err.value) == "AUTH_REQUIRED"

    # The rest of the lifecycle over gRPC.
    waiting = stub.CreateTask(
        tasks_pb2.CreateTaskRequest(description="later", defer_start=True), metadata=md, timeout=10
    )
    assert waiting.status == "created"
    started = stub.StartTask(
        tasks_pb2.StartTaskRequest(task_id=waiting.task_id), metadata=md, timeout=10
    )
    assert started.status == "started" and started.task.status == "queued"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetTaskResult(
            tasks_pb2.GetTaskResultRequest(task_id=waiting.task_id), metadata=md, timeout=10
        )
    assert err.value.code() in GRPC_CONFLICT
    assert error_reason(err.value) == "CONFLICT"
    stopped = stub.StopTask(
        tasks_pb2.StopTaskRequest(task_id=waiting.task_id, reason="not needed"),
        metadata=md,
        timeout=10,
    )
    assert stopped.status == "stopped" and stopped.task.status == "stopped"
    with pytest.raises(grpc.RpcError) as err:
        stub.CancelTask(
            tasks_pb2.CancelTaskRequest(task_id=waiting.task_id), metadata=md, timeout=10
        )
    assert err.value.code() in GRPC_CONFLICT
    assert error_reason(err.value) == "CONFLICT"
    cancelled = stub.CancelTask(
        tasks_pb2.CancelTaskRequest(task_id=task.task_id), metadata=md, timeout=10
    )
    assert cancelled.status == "cancelled" and cancelled.cancelled_at.seconds > 0

    page = stub.ListTasks(tasks_pb2.ListTasksRequest(limit=10), metadata=md, timeout=10)
    assert [t.task_id for t in page.tasks] == [waiting.task_id, task.task_id]
    assert page.total == 2 and page.limit == 10 and not page.has_more
    stats = stub.GetStats(tasks_pb2.GetStatsRequest(), metadata=md, timeout=10)
    assert (stats.total_tasks, stats.active_tasks, stats.completed_tasks) == (2, 0, 0)


def test_tasks_survive_a_restart(tmp_path: Path) -> None:
    user = new_user()
    port = free_port()
    key = f"idem-{uuid.uuid4()}"
    with MeshProcess(data_dir=tmp_path, port=port) as first:
        with httpx.Client(base_url=first.url) as client:
            reply = client.post("/api/v1/auth/register", json=user)
            assert reply.status_code == 201, reply.text
            owner = Account(
                user["username"],
                user["password"],
                reply.json()["user"]["id"],
                reply.json()["access_token"],
            )
            keyed = {
                "type": "code_review",
                "title": "Persist",
                "description": "survive a restart",
                "priority": 9,
                "model": "gpt-oss-120b",
                "metadata": {"file": "/src/auth.py", "n": 3},
                "required_capabilities": ["python"],
                "max_attempts": 4,
                "callback_url": "https://example.com/hook",
                "idempotency_key": key,
            }
            task = _create(client, owner, **keyed)
            waiting = _create(client, owner, defer_start=True)
            ended = _create(client, owner)
            gone = client.delete(f"/api/v1/tasks/{ended['task_id']}", headers=owner.headers)
            assert gone.status_code == 200, gone.text
            before = [_get(client, owner, t["task_id"]) for t in (task, waiting, ended)]
    assert first.proc is not None and first.proc.returncode == 0, first.output()

    with MeshProcess(data_dir=tmp_path, port=port) as second:
        with httpx.Client(base_url=second.url) as client:
            owner = _login(client, owner)
            after = [_get(client, owner, t["task_id"]) for t in (task, waiting, ended)]
            assert [_stable(t) for t in after] == [_stable(t) for t in before]
            assert [t["status"] for t in after] == ["queued", "created", "cancelled"]
            assert _list(client, owner)["total"] == 3
            # The idempotency key is remembered too, and what it was first used for.
            repeat = client.post("/api/v1/tasks", json=keyed, headers=owner.headers)
            assert repeat.status_code == 200, repeat.text
            assert repeat.json()["task_id"] == task["task_id"]
            reused = client.post(
                "/api/v1/tasks", json={**keyed, "priority": 8}, headers=owner.headers
            )
            assert_envelope(reused, 409, "IDEMPOTENCY_KEY_REUSED")
            # And the deferred task can still be started.
            started = client.post(
                f"/api/v1/tasks/{waiting['task_id']}/start", json={}, headers=owner.headers
            )
            assert started.status_code == 200, started.text
            assert started.json()["task"]["status"] == "queued"


class SutazAIClient:
    """Seed 004's Python client, its login/create_task/get_task as written, with httpx for
    requests (the seed's `requests.Session` API is the same for these calls)."""

    def __init__(self, base_url: str = "http://localhost:10010", token: str | None = None):
        self.base_url = base_url
        self.token = token
        self.session = httpx.Client()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def login(self, username: str, password: str) -> str:
        response = self.session.post(
            f"{self.base_url}/api/v1/auth/login", json={"username": username, "password": password}
        )
        response.raise_for_status()
        data = response.json()
        self.token = data["access_token"]
        self.session.headers["Authorization"] = f"Bearer {self.token}"
        return self.token

    def create_task(self, task_type: str, description: str, **kwargs: Any) -> dict[str, Any]:
        response = self.session.post(
            f"{self.base_url}/api/v1/tasks",
            json={"type": task_type, "description": description, **kwargs},
        )
        response.raise_for_status()
        return response.json()

    def get_task(self, task_id: str) -> dict[str, Any]:
        response = self.session.get(f"{self.base_url}/api/v1/tasks/{task_id}")
        response.raise_for_status()
        return response.json()


def test_sutazai_client_works_unchanged(mesh: MeshProcess) -> None:
    user = new_user()
    registered = httpx.post(mesh.url + "/api/v1/auth/register", json=user)
    assert registered.status_code == 201, registered.text

    client = SutazAIClient(base_url=mesh.url)
    assert client.login(user["username"], user["password"])
    task = client.create_task(
        "code_review", "Review auth module", priority=8, metadata={"file": "/src/auth.py"}
    )
    assert task["status"] == "queued"
    status = client.get_task(task["task_id"])
    assert status["task_id"] == task["task_id"]
    assert status["status"] == "queued"
    assert status["type"] == "code_review"
    assert status["priority"] == 8
    assert status["metadata"] == {"file": "/src/auth.py"}
    client.session.close()


def test_a_user_over_its_unfinished_tasks_is_told_so(tmp_path: Path) -> None:
    """AGENTMESH_OPEN_TASKS_PER_USER (2 here): one more create is a 429 in the envelope, and
    cancelling one makes room again."""
    env = {"AGENTMESH_OPEN_TASKS_PER_USER": "2"}
    with MeshProcess(data_dir=tmp_path, env=env) as mesh, httpx.Client(base_url=mesh.url) as client:
        owner = _register(client)
        created = [client.post("/api/v1/tasks", json={"description": "x"}, headers=owner.headers)]
        created.append(
            client.post("/api/v1/tasks", json={"description": "y"}, headers=owner.headers)
        )
        assert [r.status_code for r in created] == [201, 201]
        refused = client.post("/api/v1/tasks", json={"description": "z"}, headers=owner.headers)
        error = assert_envelope(refused, 429, "TASK_LIMIT_REACHED")
        assert error["details"] == {"max_open_tasks": "2"}
        cancelled = client.delete(
            f"/api/v1/tasks/{created[0].json()['task_id']}", headers=owner.headers
        )
        assert cancelled.status_code == 200, cancelled.text
        again = client.post("/api/v1/tasks", json={"description": "z"}, headers=owner.headers)
        assert again.status_code == 201, again.text
