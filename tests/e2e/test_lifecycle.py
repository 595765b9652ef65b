"""`agentmesh up` as a user meets it: ports, stopping, restarting on the same data."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from servers import launcher
from servers.launcher import MeshProcess, free_port
from tests.conftest import SHARED_MESH_ENV
from tests.helpers import new_user


def _envoy_running(data_dir: Path) -> bool:
    found = subprocess.run(
        ["pgrep", "-f", str(data_dir / "run" / "envoy.yaml")], capture_output=True, check=False
    )
    return found.returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stops_cleanly_on_signal(tmp_path: Path, sig: int) -> None:
    mesh = MeshProcess(data_dir=tmp_path).start()
    assert _envoy_running(tmp_path)
    started = time.monotonic()
    mesh.signal(sig)
    assert mesh.wait(timeout=10) == 0, mesh.output()
    assert time.monotonic() - started < 5
    assert not _envoy_running(tmp_path)
    assert "agentmesh: stopped" in mesh.output()
    # Every port is free again.
    for address in [f"127.0.0.1:{mesh.port}", *mesh.services.values()]:
        host, port = address.rsplit(":", 1)
        with socket.socket() as sock:
            # As a restarting server would: TIME_WAIT is fine, a listener is not.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
            sock.listen()


def test_envoy_does_not_outlive_a_killed_mesh(tmp_path: Path) -> None:
    """The mesh dies without stopping anything (SIGKILL, a crash, the OOM killer): its Envoy
    goes too, and the public port is free for the next `agentmesh up`."""
    port = free_port()
    mesh = MeshProcess(data_dir=tmp_path, port=port).start()
    assert _envoy_running(tmp_path)
    mesh.signal(signal.SIGKILL)
    mesh.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _envoy_running(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _envoy_running(tmp_path)
    with MeshProcess(data_dir=tmp_path, port=port) as again:
        assert httpx.get(f"{again.url}/health/live").status_code == 200


def test_taken_port_is_reported_clearly(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "servers.cli", "up"],
            env={
                "AGENTMESH_PORT": str(port),
                "AGENTMESH_DATA_DIR": str(tmp_path),
                "PATH": "/usr/bin:/bin",
            },
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert f"port {port}" in result.stderr and "already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_test_mesh_whose_free_port_was_taken_meanwhile_starts_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tests' meshes pick a free port, which another process may take before the mesh
    binds it; the launcher then picks another. A port the caller chose is not changed."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        picks = iter([taken])
        monkeypatch.setattr(launcher, "free_port", lambda: next(picks, None) or free_port())
        with MeshProcess(data_dir=tmp_path / "picked") as mesh:
            assert mesh.port != taken
            assert httpx.get(mesh.url + "/health/live").status_code == 200
        chosen = MeshProcess(data_dir=tmp_path / "chosen", port=taken)
        with pytest.raises(launcher.PortTaken, match="already in use"):
            chosen.start()


def test_bad_port_setting_is_reported_clearly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "servers.cli", "up"],
        env={"AGENTMESH_PORT": "eighty", "AGENTMESH_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "AGENTMESH_PORT must be an integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_users_and_keys_survive_a_restart(tmp_path: Path) -> None:
    user = new_user()
    port = free_port()
    with MeshProcess(data_dir=tmp_path, port=port) as first:
        token = httpx.post(first.url + "/api/v1/auth/register", json=user).json()["access_token"]
    with MeshProcess(data_dir=tmp_path, port=port) as second:
        # The signing key persisted: a token from before the restart still verifies.
        me = httpx.get(second.url + "/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200, me.text
        login = httpx.post(
            second.url + "/api/v1/auth/login",
            json={"username": user["username"], "password": user["password"]},
        )
        assert login.status_code == 200


def test_a_stop_under_load_answers_each_request_in_full_or_not_at_all(tmp_path: Path) -> None:
    """SIGTERM while eight clients create tasks, each with its own idempotency key. Envoy stops
    taking requests before the servers stop, so a request gets its 201, or no answer at all
    (refused or closed before it was answered), never a 499 or 503 from a server that was
    already stopping. After a restart every 201 is there, and resending an unanswered create
    with its key makes each task exactly once."""
    port = free_port()
    user = new_user()
    answers: list[tuple[str, int | None]] = []  # (key, status; None: no answer)
    stop = threading.Event()

    def creator(token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            while not stop.is_set():
                key = uuid.uuid4().hex
                try:
                    reply = client.post(
                        "/api/v1/tasks",
                        json={"description": "under a stop", "idempotency_key": key},
                        headers=headers,
                    )
                except httpx.TransportError:
                    answers.append((key, None))
                    time.sleep(0.05)
                    continue
                answers.append((key, reply.status_code))

    with MeshProcess(data_dir=tmp_path, port=port, env=SHARED_MESH_ENV) as mesh:
        token = httpx.post(mesh.url + "/api/v1/auth/register", json=user).json()["access_token"]
        threads = [threading.Thread(target=creator, args=(token,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        while sum(status == 201 for _, status in answers) < 50:
            time.sleep(0.05)
        mesh.signal(signal.SIGTERM)
        assert mesh.wait(timeout=15) == 0, mesh.output()
        time.sleep(0.3)
        stop.set()
        for thread in threads:
            thread.join()
    statuses = {status for _, status in answers}
    assert statuses <= {201, None}, sorted(statuses, key=str)
    with MeshProcess(data_dir=tmp_path, port=port, env=SHARED_MESH_ENV) as mesh:
        headers = {"Authorization": f"Bearer {token}"}
        for key, status in answers:
            if status is None:  # unanswered: made or not, the key says which, once
                reply = httpx.post(
                    mesh.url + "/api/v1/tasks",
                    json={"description": "under a stop", "idempotency_key": key},
                    headers=headers,
                )
                assert reply.status_code in (200, 201), reply.text
        total = httpx.get(mesh.url + "/api/v1/tasks", params={"limit": 1}, headers=headers)
        assert total.json()["total"] == len({key for key, _ in answers})
