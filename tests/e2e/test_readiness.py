"""Readiness through Envoy follows a required Redis: a real redis-server the test starts on its
own port, then stops."""

from __future__ import annotations

from pathlib import Path

import httpx

from servers.launcher import MeshProcess
from tests.conftest import RedisServer


def test_ready_follows_redis(tmp_path: Path, redis_server: RedisServer) -> None:
    url, proc = redis_server
    with MeshProcess(data_dir=tmp_path / "mesh", env={"REDIS_URL": url}) as mesh:
        ready = httpx.get(mesh.url + "/health/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert httpx.get(mesh.url + "/health").json()["services"]["redis"] == "up"

        proc.kill()
        proc.wait()
        down = httpx.get(mesh.url + "/health/ready")
        assert down.status_code == 503
        assert down.json() == {"status": "not ready", "failing": ["redis"]}
        health = httpx.get(mesh.url + "/health").json()
        assert health["status"] == "degraded" and health["services"]["redis"] == "down"
        # Liveness does not depend on anything.
        assert httpx.get(mesh.url + "/health/live").status_code == 200
