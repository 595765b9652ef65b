"""Events on Redis, with real processes: Redis stopped mid-stream loses no committed event, and
two mesh processes sharing PostgreSQL and Redis act as one."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx

from servers.launcher import MeshProcess
from tests.conftest import SHARED_MESH_ENV, RedisServer, restart_redis
from tests.e2e.test_events import Frame, create_task, events_until, frames, stream, wait_for_events
from tests.helpers import register


def _subjects(found: list[Frame]) -> list[str]:
    return [httpx.Response(200, content=f.data).json()["subject_id"] for f in found]


def test_no_committed_event_is_lost_while_redis_is_down(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    url, server = redis_server
    env = {**SHARED_MESH_ENV, "REDIS_URL": url}
    with (
        MeshProcess(data_dir=tmp_path, env=env) as mesh,
        httpx.Client(base_url=mesh.url, timeout=15) as client,
    ):
        owner = register(client)
        with stream(client, owner) as reply:
            it = frames(reply)
            first = create_task(client, owner)
            seen = events_until(it, 1)
            assert _subjects(seen) == [first]

            server.kill()
            server.wait()
            ready = client.get("/health/ready")
            assert ready.status_code == 503
            assert "redis" in ready.json()["failing"]
            # Writes go on: each change and its event commit together in the database.
            during = [create_task(client, owner) for _ in range(3)]

            again = restart_redis(redis_server)
            try:
                # The relay publishes what waited in the outbox; the open stream carries on.
                assert _subjects(events_until(it, 3)) == during
                assert client.get("/health/ready").status_code == 200
                # And a consumer that reconnects with the last id it saw before the outage
                # misses nothing (this Redis keeps no data, so only what came after is left).
                with stream(client, owner, headers={"Last-Event-ID": seen[0].id}) as resumed:
                    assert _subjects(events_until(resumed, 3)) == during
            finally:
                again.kill()
                again.wait()


def test_two_processes_on_one_redis_act_as_one(
    redis_server: RedisServer, postgres_url: str, tmp_path: Path
) -> None:
    url, _ = redis_server
    env = {**SHARED_MESH_ENV, "REDIS_URL": url, "DATABASE_URL": postgres_url}
    with MeshProcess(data_dir=tmp_path / "a", env=env) as a:
        # Replicas share the signing key and the internal token, as a deployment would.
        shutil.copytree(tmp_path / "a" / "keys", tmp_path / "b" / "keys")
        with (
            MeshProcess(data_dir=tmp_path / "b", env=env) as b,
            httpx.Client(base_url=a.url, timeout=15) as on_a,
            httpx.Client(base_url=b.url, timeout=15) as on_b,
        ):
            owner = register(on_a)
            # Subscribed on B, the change is made on A.
            with stream(on_b, owner) as reply:
                it = frames(reply)
                next(it)  # retry: the stream is open
                task_id = create_task(on_a, owner)
                on_b.delete(f"/api/v1/tasks/{task_id}", headers=owner.headers)
                got = events_until(it, 2)
            assert _subjects(got) == [task_id, task_id]
            assert [httpx.Response(200, content=f.data).json()["event_type"] for f in got] == [
                "task.created",
                "task.cancelled",
            ]
            # Each event was published once, though both processes relay the same outbox
            # (and poll it every second: give a duplicate the time to show).
            time.sleep(1.5)
            assert len(wait_for_events(on_a, owner, 2)) == 2
            assert len(wait_for_events(on_b, owner, 2)) == 2
