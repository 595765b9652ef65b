"""Small assertions shared by the tests."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime

import grpc
import httpx
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from servers.launcher import MeshProcess

ENVELOPE_KEYS = {"code", "message", "details", "timestamp", "request_id"}
# Every envelope's timestamp, whichever of Envoy and the servers wrote it: UTC, to the second.
ENVELOPE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


def assert_envelope(reply: httpx.Response, status: int, code: str) -> dict[str, object]:
    """The documented error envelope, with this HTTP status and code; returns its body."""
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    body = reply.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ENVELOPE_KEYS, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], dict)
    assert ENVELOPE_TIME.fullmatch(error["timestamp"]), error
    datetime.fromisoformat(error["timestamp"].replace("Z", "+00:00"))
    assert error["request_id"] == reply.headers["x-request-id"]
    for leak in ("Traceback", "grpc-status", 'File "'):
        assert leak not in reply.text
    return dict(error)


def error_reason(exc: grpc.RpcError) -> str:
    """ErrorInfo.reason of a failed call (empty when it carries none)."""
    status = rpc_status.from_call(exc)
    if status is None:
        return ""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def new_user() -> dict[str, str]:
    tag = secrets.token_hex(4)
    return {
        "username": f"user-{tag}",
        "email": f"user-{tag}@example.com",
        "password": f"pass-{tag}-42",
        "full_name": f"User {tag}",
    }


def grant_role(mesh: MeshProcess, login: str, role: str, database_url: str | None = None) -> None:
    """The operator's `agentmesh grant-role`, against the mesh's own data directory (and its
    PostgreSQL database when it runs on one)."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["AGENTMESH_DATA_DIR"] = str(mesh.data_dir)
    if database_url:
        env["DATABASE_URL"] = database_url
    subprocess.run(
        [sys.executable, "-m", "servers.cli", "grant-role", login, role],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )


@dataclass(frozen=True)
class Account:
    username: str
    password: str
    id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.token}"),)


def register(client: httpx.Client) -> Account:
    user = new_user()
    reply = client.post("/api/v1/auth/register", json=user)
    assert reply.status_code == 201, reply.text
    body = reply.json()
    return Account(user["username"], user["password"], body["user"]["id"], body["access_token"])


def relogin(client: httpx.Client, account: Account) -> Account:
    """The same account signed in again, so that its token carries its current roles."""
    reply = client.post(
        "/api/v1/auth/login", json={"username": account.username, "password": account.password}
    )
    assert reply.status_code == 200, reply.text
    return Account(account.username, account.password, account.id, reply.json()["access_token"])
