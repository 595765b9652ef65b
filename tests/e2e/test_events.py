"""EventsService end to end, as protos/agentmesh/v1/events.proto promises it: every task change
reaches subscribers as an event, over SSE through Envoy (`GET /api/v1/events/stream`, with `id:`
lines, `retry:`, Last-Event-ID resume and `event: ping` keepalives), over gRPC (Subscribe) and as
a list (`GET /api/v1/events`); each user sees only events about its own resources, admins all.

Each test runs twice: on the embedded mesh (in-process bus) and on a mesh whose bus is the
machine's Redis (Streams), which must behave the same.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis

from agentmesh.v1 import events_pb2, events_pb2_grpc
from servers.launcher import MeshProcess
from tests.conftest import SHARED_MESH_ENV, _stop_clean, _unavailable
from tests.helpers import Account, assert_envelope, grant_role, register, relogin

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session", params=["memory", "redis"])
def bus_mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MeshProcess]:
    """The shared embedded mesh, and a mesh on the machine's Redis under a prefix of its own."""
    if request.param == "memory":
        yield request.getfixturevalue("mesh")
        return
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.RedisError as exc:
        _unavailable(f"Redis at {REDIS_URL}", exc)
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    env = {**SHARED_MESH_ENV, "REDIS_URL": REDIS_URL, "AGENTMESH_BUS_PREFIX": prefix}
    proc = MeshProcess(data_dir=tmp_path_factory.mktemp("redismesh"), env=env).start()
    yield proc
    _stop_clean(proc)
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


@dataclass
class Frame:
    event: str = "message"
    id: str = ""
    data: str = ""
    retry: str = ""
    comments: list[str] = field(default_factory=list)


def frames(reply: httpx.Response) -> Iterator[Frame]:
    """The SSE frames of a streaming response, parsed as an EventSource does."""
    current = Frame()
    seen = False
    for line in reply.iter_lines():
        if line == "":
            if seen:
                yield current
            current, seen = Frame(), False
            continue
        seen = True
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "":
            current.comments.append(value)
        elif name in ("event", "id", "data", "retry"):
            setattr(current, name, value)


def events_until(
    source: httpx.Response | Iterator[Frame], count: int, kind: str = "message"
) -> list[Frame]:
    """The next ``count`` frames of this kind; pass the same iterator of ``frames`` to read
    on from where the last call stopped."""
    found: list[Frame] = []
    deadline = time.monotonic() + 20  # heartbeats keep the read timeout from firing
    for f in frames(source) if isinstance(source, httpx.Response) else source:
        assert time.monotonic() < deadline, f"only {len(found)} of {count} {kind} frames"
        if f.event == kind and f.data:  # a frame without data (e.g. retry:) dispatches nothing
            found.append(f)
            if len(found) == count:
                break
    return found


def create_task(client: httpx.Client, who: Account, **fields: Any) -> str:
    reply = client.post(
        "/api/v1/tasks", json={"description": "observe me", **fields}, headers=who.headers
    )
    assert reply.status_code == 201, reply.text
    return str(reply.json()["task_id"])


def list_events(client: httpx.Client, who: Account, **params: Any) -> dict[str, Any]:
    reply = client.get("/api/v1/events", params=params, headers=who.headers)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert isinstance(body, dict)
    return body


def wait_for_events(
    client: httpx.Client, who: Account, count: int, **params: Any
) -> list[dict[str, Any]]:
    """The caller's events once at least ``count`` are listed (the relay publishes after the
    commit, so an event may trail its 201 by a moment)."""
    deadline = time.monotonic() + 10
    while True:
        events = list_events(client, who, limit=100, **params)["events"]
        if len(events) >= count or time.monotonic() > deadline:
            return list(events)
        time.sleep(0.05)


def stream(client: httpx.Client, who: Account, **kw: Any) -> Any:
    headers = {**who.headers, **kw.pop("headers", {})}
    return client.stream("GET", "/api/v1/events/stream", headers=headers, **kw)


def test_sse_stream_delivers_the_callers_task_events(bus_mesh: MeshProcess) -> None:
    with httpx.Client(base_url=bus_mesh.url, timeout=10) as client:
        owner = register(client)
        with stream(client, owner, params={"patterns": "task.*"}) as reply:
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            it = frames(reply)
            assert next(it).retry.isdigit()  # the reconnection delay comes first
            task_id = create_task(client, owner, type="echo")
            client.delete(f"/api/v1/tasks/{task_id}", headers=owner.headers)
            got = []
            for f in it:
                if f.event == "message" and f.data:
                    got.append(f)
                if len(got) == 2:
                    break
    events = [httpx.Response(200, content=f.data).json() for f in got]
    assert [e["event_type"] for e in events] == ["task.created", "task.cancelled"]
    for f, e in zip(got, events, strict=True):
        assert f.id == e["event_id"]
        assert e["subject_id"] == task_id
        assert e["owner_id"] == owner.id
        assert e["data"]["task_id"] == task_id
    assert events[1]["data"]["status"] == "cancelled"
    assert got[0].id < got[1].id or len(got[0].id) < len(got[1].id)


def test_last_event_id_resumes_after_the_event_it_names(bus_mesh: MeshProcess) -> None:
    with httpx.Client(base_url=bus_mesh.url, timeout=10) as client:
        owner = register(client)
        tasks = [create_task(client, owner) for _ in range(3)]
        listed = wait_for_events(client, owner, 3)
        assert [e["subject_id"] for e in listed] == tasks
        first = listed[0]["event_id"]
        # A reconnecting EventSource sends Last-Event-ID; it wins over a stale ?after=.
        with stream(
            client, owner, params={"after": "0-0"}, headers={"Last-Event-ID": first}
        ) as reply:
            resumed = events_until(reply, 2)
        with stream(client, owner, params={"after": first}) as reply:
            by_query = events_until(reply, 2)
    expected = [e["event_id"] for e in listed[1:]]
    assert [f.id for f in resumed] == expected
    assert [f.id for f in by_query] == expected


def test_users_see_only_events_about_their_own_resources(bus_mesh: MeshProcess) -> None:
    with httpx.Client(base_url=bus_mesh.url, timeout=10) as client:
        alice, bob = register(client), register(client)
        boss = register(client)
        grant_role(bus_mesh, boss.username, "admin")
        boss = relogin(client, boss)
        theirs = create_task(client, alice)
        mine = create_task(client, bob)
        assert [e["subject_id"] for e in wait_for_events(client, bob, 1)] == [mine]
        assert [e["subject_id"] for e in wait_for_events(client, alice, 1)] == [theirs]
        seen = {e["subject_id"] for e in wait_for_events(client, boss, 2, subject_id=theirs)} | {
            e["subject_id"] for e in wait_for_events(client, boss, 1, subject_id=mine)
        }
        assert seen == {theirs, mine}
        # Bob cannot ask for Alice's task by id either: it is simply not his to see.
        assert list_events(client, bob, subject_id=theirs)["events"] == []


def test_patterns_select_event_types(bus_mesh: MeshProcess) -> None:
    with httpx.Client(base_url=bus_mesh.url, timeout=10) as client:
        owner = register(client)
        kept = create_task(client, owner)
        dropped = create_task(client, owner)
        client.delete(f"/api/v1/tasks/{dropped}", headers=owner.headers)
        everything = wait_for_events(client, owner, 3)
        assert {e["event_type"] for e in everything} == {"task.created", "task.cancelled"}
        cancelled = list_events(client, owner, patterns="*.cancelled")["events"]
        assert [(e["event_type"], e["subject_id"]) for e in cancelled] == [
            ("task.cancelled", dropped)
        ]
        exact = list_events(client, owner, patterns=["task.created"])
        assert {e["subject_id"] for e in exact["events"]} == {kept, dropped}
        assert exact["total"] == 2
        both = list_events(client, owner, patterns=["task.created", "task.cancelled"])
        assert both["total"] == 3
        first_page = list_events(client, owner, limit=2)
        assert first_page["has_more"] is True
        assert first_page["events"] == everything[:2]
        rest = list_events(client, owner, after=first_page["events"][-1]["event_id"])
        assert rest["events"] == everything[2:]


@pytest.mark.parametrize(
    ("params", "field_name"),
    [
        ({"patterns": "task.$"}, "patterns"),
        ({"patterns": [f"t{i}" for i in range(21)]}, "patterns"),
        ({"after": "yesterday"}, "after"),
        ({"subject_id": "x" * 65}, "subject_id"),
    ],
)
def test_bad_subscriptions_are_400_before_the_stream_opens(
    mesh: MeshProcess, params: dict[str, Any], field_name: str
) -> None:
    with httpx.Client(base_url=mesh.url, timeout=10) as client:
        owner = register(client)
        for path in ("/api/v1/events/stream", "/api/v1/events"):
            reply = client.get(path, params=params, headers=owner.headers)
            details = assert_envelope(reply, 400, "VALIDATION_ERROR")["details"]
            assert isinstance(details, dict) and details["field"] == field_name
        assert_envelope(
            client.get("/api/v1/events", params={"limit": 101}, headers=owner.headers),
            400,
            "VALIDATION_ERROR",
        )


def test_streams_need_a_signed_in_caller(mesh: MeshProcess) -> None:
    with httpx.Client(base_url=mesh.url, timeout=10) as client:
        assert_envelope(client.get("/api/v1/events/stream"), 401, "AUTH_REQUIRED")
        assert_envelope(client.get("/api/observability/events/stream"), 401, "AUTH_REQUIRED")
        assert_envelope(client.get("/api/v1/events"), 401, "AUTH_REQUIRED")


def test_idle_streams_get_heartbeats(bus_mesh: MeshProcess) -> None:
    with httpx.Client(base_url=bus_mesh.url, timeout=10) as client:
        owner = register(client)
        with stream(client, owner, params={"patterns": "nothing.ever"}) as reply:
            pings = events_until(reply, 1, kind="ping")
        # Seed 001's deprecated path serves the same stream.
        with client.stream(
            "GET", "/api/observability/events/stream", headers=owner.headers
        ) as reply:
            assert reply.status_code == 200
            assert events_until(reply, 1, kind="ping")
    body = httpx.Response(200, content=pings[0].data).json()
    assert "time" in body


def test_grpc_subscribe_replays_then_follows(bus_mesh: MeshProcess) -> None:
    with httpx.Client(base_url=bus_mesh.url, timeout=10) as client:
        owner = register(client)
        earlier = create_task(client, owner)
        (created,) = wait_for_events(client, owner, 1)
        before = created["event_id"]
        followed_before: list[str] = []
        # Straight to the messaging server, and through Envoy on the same port as REST.
        for address in (bus_mesh.services["messaging"], bus_mesh.url.removeprefix("http://")):
            channel = grpc.insecure_channel(address)
            stub = events_pb2_grpc.EventsServiceStub(channel)
            call = stub.Subscribe(
                events_pb2.SubscribeRequest(patterns=["task.*"], after="0-0"),
                metadata=owner.metadata,
                timeout=15,
            )
            try:
                events = (f.event for f in call if f.HasField("event"))
                replayed = [next(events) for _ in range(1 + len(followed_before))]
                assert (replayed[0].event_id, replayed[0].subject_id) == (before, earlier)
                assert [e.subject_id for e in replayed[1:]] == followed_before
                later = create_task(client, owner)
                followed = next(events)
                assert followed.subject_id == later
                followed_before.append(later)
                assert followed.event_type == "task.created"
                assert followed.event_id > before or len(followed.event_id) > len(before)
            finally:
                call.cancel()
                channel.close()


def test_grpc_subscribe_refuses_bad_patterns_before_streaming(mesh: MeshProcess) -> None:
    with httpx.Client(base_url=mesh.url, timeout=10) as client:
        owner = register(client)
    with grpc.insecure_channel(mesh.services["messaging"]) as channel:
        stub = events_pb2_grpc.EventsServiceStub(channel)
        call = stub.Subscribe(
            events_pb2.SubscribeRequest(patterns=["no spaces"]), metadata=owner.metadata
        )
        with pytest.raises(grpc.RpcError) as caught:
            next(iter(call))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_open_streams_end_in_band_when_the_mesh_stops(tmp_path: Path) -> None:
    proc = MeshProcess(data_dir=tmp_path, env=SHARED_MESH_ENV).start()
    try:
        with httpx.Client(base_url=proc.url, timeout=10) as client:
            owner = register(client)
            with stream(client, owner) as reply:
                it = frames(reply)
                next(it)  # retry: the stream is open
                started = time.monotonic()
                proc.signal(15)
                last = list(it)
        assert last and last[-1].event == "end", last
        assert httpx.Response(200, content=last[-1].data).json() == {"reason": "SERVER_SHUTDOWN"}
        assert proc.wait(15) == 0
        # The stream did not hold the drain for its grace period (5 s).
        assert time.monotonic() - started < 4
    finally:
        with contextlib.suppress(Exception):
            proc.stop()


def test_security_events_reach_the_account_they_concern(mesh: MeshProcess) -> None:
    with httpx.Client(base_url=mesh.url, timeout=10) as client:
        owner = register(client)
        other = register(client)
        created = client.post(
            "/api/v1/auth/api-keys", json={"name": "ci", "scopes": ["read"]}, headers=owner.headers
        )
        assert created.status_code == 201, created.text
        key_id = created.json()["api_key"]["key_id"]
        revoked = client.delete(f"/api/v1/auth/api-keys/{key_id}", headers=owner.headers)
        assert revoked.status_code in (200, 204), revoked.text
        changed = client.post(
            "/api/v1/auth/change-password",
            json={"current_password": owner.password, "new_password": "another-pass-42"},
            headers=owner.headers,
        )
        assert changed.status_code in (200, 204), changed.text
        # The change ended the old session; the reply holds the new one.
        owner = replace(owner, password="another-pass-42", token=changed.json()["access_token"])
        events = wait_for_events(client, owner, 3, patterns="security.*")
        assert [e["event_type"] for e in events] == [
            "security.api_key_created",
            "security.api_key_revoked",
            "security.password_changed",
        ]
        assert {e["subject_id"] for e in events} == {owner.id}
        assert events[1]["data"]["key_id"] == key_id
        # Not a word of it to anyone else.
        assert list_events(client, other, patterns="security.*")["events"] == []


def test_a_role_the_operator_grants_is_a_security_event(mesh: MeshProcess) -> None:
    """`agentmesh grant-role`, which makes admins, left no trace among the events, while the
    same change through UsersService did. Granting a role held already is no change."""
    with httpx.Client(base_url=mesh.url, timeout=10) as client:
        target = register(client)
        grant_role(mesh, target.username, "developer")
        grant_role(mesh, target.username, "developer")
        target = relogin(client, target)
        events = wait_for_events(client, target, 1, patterns="security.roles_changed")
        assert len(events) == 1, events
        assert events[0]["subject_id"] == target.id
        assert events[0]["data"]["by"] == "operator"
        assert "developer" in events[0]["data"]["roles"]


def test_a_user_may_hold_twenty_event_streams(mesh: MeshProcess) -> None:
    with httpx.Client(base_url=mesh.url, timeout=10) as client:
        owner, other = register(client), register(client)
        with contextlib.ExitStack() as streams:
            opened = [streams.enter_context(stream(client, owner)) for _ in range(20)]
            assert all(reply.status_code == 200 for reply in opened)
            refused = client.get("/api/v1/events/stream", headers=owner.headers)
            error = assert_envelope(refused, 429, "RATE_LIMIT_EXCEEDED")
            assert refused.headers["retry-after"] == "5"
            assert error["details"] == {"limit": "20", "retry_after": "5"}  # ErrorInfo metadata
            # The limit is the user's: another user is not affected.
            with stream(client, other) as theirs:
                assert theirs.status_code == 200
            opened[0].close()
        # Closed streams give their places back.
        deadline = time.monotonic() + 5
        while True:
            with stream(client, owner) as again:
                if again.status_code == 200 or time.monotonic() > deadline:
                    assert again.status_code == 200
                    break
            time.sleep(0.1)


def test_an_admins_key_stream_of_everyones_events_ends_when_the_admin_is_demoted(
    mesh: MeshProcess,
) -> None:
    """A token loses its roles with the change, but an API key follows its owner's roles: a
    demoted admin's key went on streaming every user's events. The stream is checked again
    every heartbeat interval (1 s here), admin rights included."""
    with httpx.Client(base_url=mesh.url, timeout=10) as client:
        boss, erin, carol = register(client), register(client), register(client)
        for admin in (boss, erin):
            grant_role(mesh, admin.username, "admin")
        boss, erin = relogin(client, boss), relogin(client, erin)
        body = {"name": "everything", "scopes": ["read"]}
        created = client.post("/api/v1/auth/api-keys", json=body, headers=erin.headers)
        assert created.status_code == 201, created.text
        by_key = {"Authorization": f"Bearer {created.json()['key']}"}
        with stream(client, erin, headers=by_key, params={"patterns": "task.created"}) as keyed:
            assert keyed.status_code == 200
            keyed_frames = frames(keyed)
            task_id = create_task(client, carol)
            (seen,) = events_until(keyed_frames, 1)  # an admin sees everyone's
            assert httpx.Response(200, content=seen.data).json()["subject_id"] == task_id
            demoted = client.put(
                f"/api/v1/users/{erin.id}/roles", json={"roles": ["user"]}, headers=boss.headers
            )
            assert demoted.status_code == 200, demoted.text
            started = time.monotonic()
            rest = list(keyed_frames)  # the stream ends by itself
            assert time.monotonic() - started < 8
            assert rest and rest[-1].event == "error", rest
            refusal = httpx.Response(200, content=rest[-1].data).json()
            assert refusal["code"] == "INSUFFICIENT_PERMISSIONS", refusal


def test_revoking_the_key_ends_the_event_stream_it_opened(mesh: MeshProcess) -> None:
    """A stream outlives the call that opened it, not its credential: the key is checked again
    every heartbeat interval (1 s here), and once revoked the stream's last frame is the
    refusal. The same user's other streams are not touched."""
    with httpx.Client(base_url=mesh.url, timeout=10) as client:
        owner = register(client)
        body = {"name": "feed", "scopes": ["read"]}
        created = client.post("/api/v1/auth/api-keys", json=body, headers=owner.headers)
        assert created.status_code == 201, created.text
        key, key_id = created.json()["key"], created.json()["api_key"]["key_id"]
        by_key = {"Authorization": f"Bearer {key}"}
        created_only = {"patterns": "task.created"}
        with (
            stream(client, owner, headers=by_key, params=created_only) as keyed,
            stream(client, owner, params=created_only) as signed_in,
        ):
            assert keyed.status_code == 200 and signed_in.status_code == 200
            keyed_frames, signed_in_frames = frames(keyed), frames(signed_in)
            task_id = create_task(client, owner)
            (seen,) = events_until(keyed_frames, 1)
            assert httpx.Response(200, content=seen.data).json()["subject_id"] == task_id
            revoked = client.delete(f"/api/v1/auth/api-keys/{key_id}", headers=owner.headers)
            assert revoked.status_code == 200, revoked.text
            started = time.monotonic()
            rest = list(keyed_frames)  # the stream ends by itself
            assert time.monotonic() - started < 5
            assert rest and rest[-1].event == "error", rest
            refusal = httpx.Response(200, content=rest[-1].data).json()
            assert refusal["code"] == "AUTH_REQUIRED" and "revoked" in refusal["message"]
            # The token's stream goes on, and sees what is new.
            later = create_task(client, owner)
            delivered = events_until(signed_in_frames, 2)
            subjects = [httpx.Response(200, content=f.data).json()["subject_id"] for f in delivered]
            assert subjects == [task_id, later]
