"""Odd inputs at the edge, through the real mesh: what a lenient parser, a trailing slash, a
near-gRPC content type or oversized headers would let past the edge's REST checks, and what
Envoy's access log keeps. tests/gateway/test_edge_checks.py has the checks that need no server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import httpx
import pytest

from agentmesh.v1 import health_pb2, health_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from servers.launcher import MeshProcess
from tests.helpers import assert_envelope, error_reason, new_user


@pytest.fixture(scope="module")
def auth(mesh: MeshProcess) -> dict[str, str]:
    token = httpx.post(mesh.url + "/api/v1/auth/register", json=new_user()).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


def _task_count(mesh: MeshProcess, auth: dict[str, str]) -> int:
    listed = httpx.get(mesh.url + "/api/v1/tasks", headers=auth)
    assert listed.status_code == 200, listed.text
    return int(listed.json()["total"])


def test_a_body_that_is_not_strict_json_is_refused(mesh: MeshProcess, auth: dict[str, str]) -> None:
    """protobuf's parser takes single quotes, bare keys and a trailing comma, and a typo with
    them: such a body made a task (201) with the misspelt field dropped."""
    before = _task_count(mesh, auth)
    headers = {**auth, "content-type": "application/json"}
    with httpx.Client(base_url=mesh.url, headers=headers) as client:
        for body in (
            "{'type':'echo','description':'x','prority':3}",
            '{prority:3,description:"x",type:"echo"}',
            '{"type":"echo","description":"x",}',
            '{"type":"echo","description":"x","metadata":{\'a\':1}}',
        ):
            error = assert_envelope(
                client.post("/api/v1/tasks", content=body), 400, "VALIDATION_ERROR"
            )
            assert "not valid JSON" in str(error["message"]), error
        # Everything strict JSON allows still goes: escapes, unicode, any whitespace, nesting.
        good = (
            '\r\n{ "type" :\t"echo", "description": "caf\\u00e9 \\"x\\" \\\\ \\/ \\b\\f\\n\\r\\t'
            ' é \U0001f600", "metadata": {"a": [1, -0.5e+3, 2E-2, true, false, null, {}, [], '
            '{"b": [[["\\ud83d\\ude00"]]]}], "": ""}, "priority": 9 }\n'
        )
        made = client.post("/api/v1/tasks", content=good.encode())
        assert made.status_code == 201, made.text
        assert made.json()["description"] == 'café "x" \\ / \b\f\n\r\t é \U0001f600'
        assert made.json()["metadata"]["a"][1] == -500
    assert _task_count(mesh, auth) == before + 1


def test_a_trailing_slash_is_checked_too(mesh: MeshProcess, auth: dict[str, str]) -> None:
    """The transcoder routes /api/v1/tasks/ as /api/v1/tasks; the edge used to skip such
    paths, so a typo made a task (201) and a misspelt reason stopped one (200)."""
    with httpx.Client(base_url=mesh.url, headers=auth) as client:
        made = client.post("/api/v1/tasks/", json={"type": "echo", "description": "x"})
        assert made.status_code == 201, made.text
        before = _task_count(mesh, auth)
        typo = client.post(
            "/api/v1/tasks/", json={"type": "nosuch", "description": "x", "prority": 3}
        )
        error = assert_envelope(typo, 400, "VALIDATION_ERROR")
        assert error["message"] == 'unknown field "prority" in the request body'
        lone = client.post(
            "/api/v1/tasks/",
            json={"type": "echo", "description": "x", "required_capabilities": "echo"},
        )
        assert_envelope(lone, 400, "VALIDATION_ERROR")
        assert _task_count(mesh, auth) == before
        task_id = made.json()["task_id"]
        stop = client.post(f"/api/v1/tasks/{task_id}/stop/", json={"reasn": "typo"})
        assert_envelope(stop, 400, "VALIDATION_ERROR")
        assert client.get(f"/api/v1/tasks/{task_id}").json()["status"] == "queued"


@pytest.mark.parametrize(
    "ctype",
    [
        "application/grpc-web+json",
        "application/grpcx",
        "application/grpc-json",
        "application/grpc;charset=utf-8",
    ],
)
def test_a_content_type_that_only_looks_like_grpc_is_rest(
    mesh: MeshProcess, auth: dict[str, str], ctype: str
) -> None:
    """Envoy transcodes these as REST (gRPC is application/grpc or application/grpc+...): the
    edge shapes and checks them as REST too, instead of passing a raw google.rpc.Status, a
    200 for a 201, and any unknown field."""
    headers = {**auth, "content-type": ctype}
    with httpx.Client(base_url=mesh.url, headers=headers) as client:
        typo = client.post(
            "/api/v1/tasks", content=b'{"type":"echo","description":"x","prority":3}'
        )
        assert_envelope(typo, 400, "VALIDATION_ERROR")
        made = client.post("/api/v1/tasks", content=b'{"type":"echo","description":"x"}')
        assert made.status_code == 201, made.text
        assert "grpc-status" not in made.headers
        # A service's error in the envelope, not as {"code":5,...}.
        missing = client.get("/api/v1/tasks/00000000-0000-0000-0000-000000000000")
        assert_envelope(missing, 404, "TASK_NOT_FOUND")


def _padded(size: int) -> dict[str, str]:
    return {"x-padding": "a" * size}


def _too_large(reply: httpx.Response) -> None:
    """431 VALIDATION_ERROR. Envoy's codec refuses before a request id is made (docs/errors.md),
    edge.lua after."""
    if "x-request-id" in reply.headers:
        error = assert_envelope(reply, 431, "VALIDATION_ERROR")
    else:
        assert reply.status_code == 431, reply.text
        error = reply.json()["error"]
        assert error["code"] == "VALIDATION_ERROR" and error["request_id"] is None, error
    assert "headers are too large" in str(error["message"]), error


def test_request_headers_are_refused_at_the_edge_before_a_server_would(
    mesh: MeshProcess, auth: dict[str, str]
) -> None:
    """A server takes 8 KiB of metadata and refuses more at random (RESOURCE_EXHAUSTED, which
    REST saw as a 429 RATE_LIMIT_EXCEEDED without Retry-After): the edge refuses such headers
    itself, always, with 431 VALIDATION_ERROR. No size gets a 429."""
    seen: dict[int, set[int]] = {}
    with httpx.Client(base_url=mesh.url) as client:
        for size in range(5000, 20000, 500):
            for path, headers in (("/health", {}), ("/api/v1/tasks?limit=1", auth)):
                for _ in range(2):
                    reply = client.get(path, headers={**headers, **_padded(size)})
                    seen.setdefault(size, set()).add(reply.status_code)
                    if reply.status_code != 200:
                        _too_large(reply)
    assert seen[5000] == {200}
    assert all(statuses == {431} for size, statuses in seen.items() if size >= 8000), seen
    # Past Envoy's own limit, too: its codec answers before any filter.
    _too_large(httpx.get(mesh.url + "/health", headers=_padded(70_000)))


def test_grpc_metadata_over_the_limit_is_resource_exhausted_always(mesh: MeshProcess) -> None:
    """A native gRPC caller gets what a server would answer, RESOURCE_EXHAUSTED, but every
    time rather than at random, and from the edge."""
    with grpc.insecure_channel(mesh.url.removeprefix("http://")) as channel:
        stub = health_pb2_grpc.HealthServiceStub(channel)
        stub.GetLiveness(health_pb2.GetLivenessRequest(), metadata=tuple(_padded(5000).items()))
        for size in (8500, 10_000, 12_000):
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.GetLiveness(
                        health_pb2.GetLivenessRequest(),
                        metadata=tuple(_padded(size).items()),
                        timeout=10,
                    )
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
                assert "headers are too large" in str(refused.value.details())


def test_a_rest_clients_grpc_headers_do_not_reach_the_server(
    mesh: MeshProcess, auth: dict[str, str]
) -> None:
    """grpc-timeout from a REST client became the call's deadline: its create answered 504 while
    the task was made anyway, and a malformed one was a 500. The transcoder writes gRPC's
    headers; a REST client's are dropped."""
    before = _task_count(mesh, auth)
    body = {"type": "echo", "description": "not behind a 504"}
    for timeout in ("1n", "1m", "bogus"):
        headers = {**auth, "grpc-timeout": timeout, "grpc-encoding": "gzip"}
        made = httpx.post(mesh.url + "/api/v1/tasks", headers=headers, json=body)
        assert made.status_code == 201, made.text
    assert _task_count(mesh, auth) == before + 3


def test_a_grpc_request_over_the_edges_limit_is_resource_exhausted(mesh: MeshProcess) -> None:
    """The edge takes at most 1 MiB of request, gRPC too; a larger call was UNKNOWN "Payload
    Too Large", without ErrorInfo. It is refused as a server refuses a message over its limit,
    with the documented code."""
    with grpc.insecure_channel(mesh.url.removeprefix("http://")) as channel:
        stub = tasks_pb2_grpc.TasksServiceStub(channel)
        big = tasks_pb2.CreateTaskRequest(type="echo", description="x" * (1024 * 1024 + 1))
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateTask(big, timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
    assert "larger than 1 MiB" in str(refused.value.details())
    assert error_reason(refused.value) == "VALIDATION_ERROR"


def test_a_header_with_an_underscore_is_dropped(mesh: MeshProcess) -> None:
    """`x_foo` is dropped, not refused: over HTTP/1.1 it was a bare 400, and over HTTP/2 (gRPC,
    whose metadata keys may hold "_") a reset stream with no answer at all."""
    reply = httpx.get(mesh.url + "/health/live", headers={"x_foo": "1"})
    assert reply.status_code == 200, reply.text
    with grpc.insecure_channel(mesh.url.removeprefix("http://")) as channel:
        stub = health_pb2_grpc.HealthServiceStub(channel)
        stub.GetLiveness(health_pb2.GetLivenessRequest(), metadata=(("x_foo", "1"),), timeout=10)


def test_credentials_in_a_query_string_stay_out_of_the_access_log(
    mesh: MeshProcess, auth: dict[str, str]
) -> None:
    token = auth["Authorization"].removeprefix("Bearer ")
    reply = httpx.get(mesh.url + "/api/v1/auth/me", params={"access_token": token})
    assert_envelope(reply, 400, "VALIDATION_ERROR")
    rid = reply.headers["x-request-id"]
    log = Path(mesh.data_dir / "logs" / "envoy.log")
    deadline = time.monotonic() + 20  # Envoy flushes its log every 10 s
    line: dict[str, object] = {}
    while not line and time.monotonic() < deadline:
        for text in log.read_text().splitlines():
            if rid in text:
                line = json.loads(text)
        time.sleep(0.1)
    assert line["path"] == line["rpc"] == "/api/v1/auth/me", line
    assert token not in log.read_text()


def test_text_with_a_nul_character_is_refused_on_every_database(any_mesh: MeshProcess) -> None:
    """JSON may escape a NUL (\\u0000), and protobuf carries it; PostgreSQL's text cannot hold
    one, so a task with one in its description was a 500 there (and a stored NUL on SQLite).
    Every RPC now refuses a NUL in any text field with a 400 naming the field, whatever the
    database; JSON values (metadata, results, payloads) are stored as JSON and keep theirs."""
    with httpx.Client(base_url=any_mesh.url, timeout=10) as client:
        signed_up = client.post("/api/v1/auth/register", json=new_user())
        client.headers["Authorization"] = f"Bearer {signed_up.json()['access_token']}"
        for body, field in (
            ({"description": "a\x00b"}, "description"),
            ({"description": "x", "title": "t\x00"}, "title"),
            ({"description": "x", "idempotency_key": "k\x00"}, "idempotency_key"),
            (
                {"description": "x", "required_capabilities": ["ok", "b\x00"]},
                "required_capabilities",
            ),
        ):
            error = assert_envelope(
                client.post("/api/v1/tasks", json=body), 400, "VALIDATION_ERROR"
            )
            assert error["message"] == f"{field} must not contain NUL characters", error
            assert error["details"] == {"field": field}
        # In a query string alike (the edge refuses one in a path before any server sees it).
        query = client.get("/api/v1/tasks?status=queued%00")
        assert assert_envelope(query, 400, "VALIDATION_ERROR")["details"] == {"field": "status"}
        path = client.get("/api/v1/tasks/a%00b")
        assert (path.status_code, path.json()["error"]["code"]) == (400, "VALIDATION_ERROR")
        kept = client.post("/api/v1/tasks", json={"description": "x", "metadata": {"k": "v\x00"}})
        assert kept.status_code == 201, kept.text
        assert client.get(f"/api/v1/tasks/{kept.json()['task_id']}").json()["metadata"] == {
            "k": "v\x00"
        }


def test_task_labels_with_invisible_characters_are_refused(
    mesh: MeshProcess, auth: dict[str, str]
) -> None:
    """A task's title and model are one-line labels shown in lists; a bidi override or a
    zero-width character there makes one task look like another, a control rewrites a
    terminal. A type is a name agents match. The description is free text and keeps any."""
    with httpx.Client(base_url=mesh.url, headers=auth, timeout=10) as client:
        for body, field in (
            ({"description": "x", "title": "pay \u202eSU 001"}, "title"),
            ({"description": "x", "title": "two\nlines"}, "title"),
            ({"description": "x", "model": "gpt\u200b"}, "model"),
            ({"description": "x", "type": "echo\n"}, "type"),
        ):
            error = assert_envelope(
                client.post("/api/v1/tasks", json=body), 400, "VALIDATION_ERROR"
            )
            assert error["details"] == {"field": field}, error
        free = "line one\nline two \u202e\u200b\t"
        kept = client.post("/api/v1/tasks", json={"description": free, "title": "Ünïcode ok"})
        assert kept.status_code == 201, kept.text
        assert (kept.json()["description"], kept.json()["title"]) == (free, "Ünïcode ok")


def test_grpc_text_with_a_nul_character_is_invalid_argument(mesh: MeshProcess) -> None:
    """The same rule for a gRPC client, whatever the field's depth (a repeated field here)."""
    token = httpx.post(mesh.url + "/api/v1/auth/register", json=new_user()).json()["access_token"]
    with grpc.insecure_channel(mesh.services["tasks"]) as channel:
        stub = tasks_pb2_grpc.TasksServiceStub(channel)
        request = tasks_pb2.CreateTaskRequest(description="x", required_capabilities=["\x00"])
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateTask(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "required_capabilities must not contain NUL characters"
