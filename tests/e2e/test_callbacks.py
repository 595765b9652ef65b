"""Task callbacks through a running mesh: a task created over REST with a callback_url is called
back when it ends, once, signed with the mesh's callback secret (docs/callbacks.md)."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from servers.launcher import MeshProcess
from tests.conftest import SHARED_MESH_ENV
from tests.e2e.test_events import create_task
from tests.helpers import register

Received = tuple[dict[str, str], bytes]


@pytest.fixture
def receiver() -> Iterator[tuple[str, queue.Queue[Received]]]:
    """An HTTP endpoint on 127.0.0.1 that records every POST and answers 204."""
    got: queue.Queue[Received] = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers["content-length"]))
            got.put(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", got
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_an_ended_task_is_called_back_once_signed(
    tmp_path: Path, receiver: tuple[str, queue.Queue[Received]]
) -> None:
    url, got = receiver
    env = {**SHARED_MESH_ENV, "AGENTMESH_CALLBACK_ALLOW_PRIVATE": "1"}
    with (
        MeshProcess(data_dir=tmp_path, env=env) as mesh,
        httpx.Client(base_url=mesh.url, timeout=10) as client,
    ):
        owner = register(client)
        task_id = create_task(client, owner, callback_url=url)
        # Nothing is sent while the task is merely created.
        with pytest.raises(queue.Empty):
            got.get(timeout=1.5)
        assert client.delete(f"/api/v1/tasks/{task_id}", headers=owner.headers).is_success
        headers, body = got.get(timeout=10)
        with pytest.raises(queue.Empty):
            got.get(timeout=1.5)
        secret = (tmp_path / "keys" / "callback-secret").read_text().strip()
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert headers["x-agentmesh-signature"] == f"sha256={expected}"
    assert headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert payload["event_type"] == "task.cancelled"
    assert payload["task_id"] == task_id
    assert payload["task"]["status"] == "cancelled"
    assert headers["x-agentmesh-event-id"] == payload["event_id"]


def test_callbacks_to_private_addresses_are_refused_by_default(
    tmp_path: Path, receiver: tuple[str, queue.Queue[Received]]
) -> None:
    url, got = receiver
    with (
        MeshProcess(data_dir=tmp_path, env=SHARED_MESH_ENV) as mesh,
        httpx.Client(base_url=mesh.url, timeout=10) as client,
    ):
        owner = register(client)
        task_id = create_task(client, owner, callback_url=url)
        assert client.delete(f"/api/v1/tasks/{task_id}", headers=owner.headers).is_success
        with pytest.raises(queue.Empty):
            got.get(timeout=3)
