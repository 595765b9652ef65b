"""OpenTelemetry traces (servers/common/tracing.py), as a collector receives them: the mesh on its
default, with OTEL_EXPORTER_OTLP_ENDPOINT pointing at an OTLP/HTTP receiver of the test's own,
called through Envoy with a W3C traceparent."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from servers.common.config import Settings
from servers.launcher import MeshProcess, free_port
from tests.conftest import SHARED_MESH_ENV, RedisServer
from tests.helpers import register


class _Collector(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Receive)
        self.spans: list[trace_pb2.Span] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> list[trace_pb2.Span]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [span for span in self.spans if predicate(span)]
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError("no such span reached the collector")

    def of_trace(self, trace_id: bytes) -> list[trace_pb2.Span]:
        with self.lock:
            return [span for span in self.spans if span.trace_id == trace_id]


class _Receive(BaseHTTPRequestHandler):
    server: _Collector

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/v1/traces":
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            with self.server.lock:
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        self.server.spans.extend(scope.spans)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()
        self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def collector() -> Iterator[_Collector]:
    server = _Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def traced(
    request: pytest.FixtureRequest,
    collector: _Collector,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MeshProcess]:
    """The mesh on each database: statements run through SQLAlchemy's greenlets on
    PostgreSQL, and must still find the RPC's span."""
    env = {
        **SHARED_MESH_ENV,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    if request.param == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_url")
    with MeshProcess(data_dir=tmp_path_factory.mktemp("traced"), env=env) as mesh:
        yield mesh


def _attributes(span: trace_pb2.Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in span.attributes:
        kind = item.value.WhichOneof("value")
        out[item.key] = getattr(item.value, kind) if kind else None
    return out


def _traceparent() -> tuple[bytes, bytes, str]:
    trace_id, span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    return trace_id, span_id, f"00-{trace_id.hex()}-{span_id.hex()}-01"


def test_an_rpc_joins_the_callers_trace_with_its_statements(
    traced: MeshProcess, collector: _Collector
) -> None:
    with httpx.Client(base_url=traced.url, timeout=10) as client:
        ada = register(client)
        trace_id, parent_id, header = _traceparent()
        made = client.post(
            "/api/v1/tasks",
            json={"description": "traced"},
            headers={**ada.headers, "traceparent": header},
        )
        assert made.status_code == 201, made.text

    (rpc,) = collector.wait_for(
        lambda s: s.trace_id == trace_id and s.name == "agentmesh.v1.TasksService/CreateTask"
    )
    assert rpc.parent_span_id == parent_id
    assert rpc.kind == trace_pb2.Span.SPAN_KIND_SERVER
    attributes = _attributes(rpc)
    assert attributes["rpc.system"] == "grpc" and attributes["rpc.grpc.status_code"] == 0
    assert attributes["agentmesh.request_id"] == made.headers["x-request-id"]
    # The task's INSERT is a child of the RPC's span, with the statement.
    statements = collector.wait_for(
        lambda s: s.trace_id == trace_id and s.parent_span_id == rpc.span_id
    )
    inserts = [
        s for s in statements if "INSERT INTO tasks_tasks" in _attributes(s)["db.query.text"]
    ]
    assert inserts and inserts[0].name in ("INSERT sqlite", "INSERT postgresql")
    assert inserts[0].kind == trace_pb2.Span.SPAN_KIND_CLIENT
    # The access log line of the call carries the trace.
    log = Path(traced.log_path).read_text()
    assert any(trace_id.hex() in line and "CreateTask" in line for line in log.splitlines()), (
        "no access log line with the trace id"
    )


def test_a_failed_rpc_is_an_error_span_and_a_call_without_a_parent_starts_a_trace(
    traced: MeshProcess, collector: _Collector
) -> None:
    with httpx.Client(base_url=traced.url, timeout=10) as client:
        ada = register(client)
        trace_id, _, header = _traceparent()
        missing = client.get("/api/v1/tasks/nope", headers={**ada.headers, "traceparent": header})
        assert missing.status_code == 404
        plain = client.get("/api/v1/auth/me", headers=ada.headers)
        assert plain.status_code == 200

    (failed,) = collector.wait_for(
        lambda s: s.trace_id == trace_id and s.name.endswith("TasksService/GetTask")
    )
    assert failed.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert _attributes(failed)["rpc.grpc.status_code"] == 5  # NOT_FOUND
    assert _attributes(failed)["agentmesh.reason"] == "TASK_NOT_FOUND"
    request_id = plain.headers["x-request-id"]
    (root,) = collector.wait_for(lambda s: _attributes(s).get("agentmesh.request_id") == request_id)
    assert root.parent_span_id == b"" and root.name == "agentmesh.v1.AuthService/GetMe"


def test_redis_commands_are_spans_of_the_rpc(
    collector: _Collector, redis_server: RedisServer, tmp_path: Path
) -> None:
    """With Redis, the quota's script for the call is a child span of the call's span."""
    env = {
        **SHARED_MESH_ENV,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "REDIS_URL": redis_server[0],
    }
    with (
        MeshProcess(data_dir=tmp_path, env=env) as mesh,
        httpx.Client(base_url=mesh.url, timeout=10) as client,
    ):
        ada = register(client)
        trace_id, _, header = _traceparent()
        listed = client.get("/api/v1/tasks", headers={**ada.headers, "traceparent": header})
        assert listed.status_code == 200
        (rpc,) = collector.wait_for(
            lambda s: s.trace_id == trace_id and s.name.endswith("TasksService/ListTasks")
        )
        (script,) = collector.wait_for(
            lambda s: s.trace_id == trace_id and s.name == "EVALSHA redis"
        )
    assert script.parent_span_id == rpc.span_id
    assert _attributes(script)["db.system.name"] == "redis"


def test_an_unreachable_collector_does_not_hold_up_a_stop(tmp_path: Path) -> None:
    """The SDK retries an unreachable collector for tens of seconds (13 s here, before the
    export moved off the stopping loop); a stopping mesh waits for it two seconds at most."""
    env = {**SHARED_MESH_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    mesh = MeshProcess(data_dir=tmp_path, env=env).start()
    try:
        with httpx.Client(base_url=mesh.url, timeout=10) as client:
            register(client)  # spans waiting for export
    finally:
        started = time.monotonic()
        code = mesh.stop()
    assert code == 0, mesh.output()
    assert time.monotonic() - started < 6
    assert "spans not exported" in mesh.output()


def test_tracing_is_off_without_a_collector() -> None:
    assert not Settings.from_env({}).tracing
    assert Settings.from_env(
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}
    ).tracing
