"""Readiness through Envoy follows a required Redis: a real redis-server the test starts on its
own port, then stops."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from servers.launcher import MeshProcess, free_port
from tests.conftest import IN_CI

Redis = tuple[str, subprocess.Popen[bytes]]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    binary = shutil.which("redis-server")
    if binary is None:
        if IN_CI:
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            time.sleep(0.05)
    client.close()
    try:
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.kill()
        proc.wait()


def test_ready_follows_redis(
    tmp_path: Path, redis_server: tuple[str, subprocess.Popen[bytes]]
) -> None:
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
