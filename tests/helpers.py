"""Small assertions shared by the tests."""

from __future__ import annotations

import secrets
from datetime import datetime

import grpc
import httpx
from google.rpc import error_details_pb2
from grpc_status import rpc_status

ENVELOPE_KEYS = {"code", "message", "details", "timestamp", "request_id"}


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
