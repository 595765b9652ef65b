"""servers/common/protos.py: the NUL check every request passes (interceptors._tolerant)."""

from __future__ import annotations

from agentmesh.v1 import agents_pb2, common_pb2, tasks_pb2
from servers.common.protos import nul_field


def test_nul_field_names_the_first_text_field_holding_a_nul() -> None:
    assert nul_field(tasks_pb2.CreateTaskRequest(description="plain", title="t")) is None
    assert nul_field(tasks_pb2.CreateTaskRequest(description="a\x00")) == "description"
    listed = tasks_pb2.CreateTaskRequest(required_capabilities=["ok", "\x00"])
    assert nul_field(listed) == "required_capabilities"
    nested = agents_pb2.ConnectRequest(
        result=agents_pb2.TaskResult(task_id="t", error=tasks_pb2.TaskError(message="x\x00"))
    )
    assert nul_field(nested) == "result.error.message"
    # Maps: a key or a text value.
    assert nul_field(common_pb2.StreamError(details={"k\x00": "v"})) == "details"
    assert nul_field(common_pb2.StreamError(details={"k": "v\x00"})) == "details.k"


def test_json_values_keep_their_nul_characters() -> None:
    """A Struct is stored as JSON, where a NUL is an escape like any other."""
    request = tasks_pb2.CreateTaskRequest(description="x")
    request.metadata.update({"k\x00": "v\x00", "list": ["\x00"], "deep": {"a": "\x00"}})
    assert nul_field(request) is None
