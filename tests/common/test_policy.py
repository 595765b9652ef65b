"""The policy table against the contract: every RPC has a rule, and the rules are the right kind."""

from __future__ import annotations

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import MethodDescriptor

from agentmesh.v1 import (
    agents_pb2,
    auth_pb2,
    events_pb2,
    health_pb2,
    messaging_pb2,
    tasks_pb2,
    users_pb2,
)
from servers.common.errors import PermissionDenied
from servers.common.policy import POLICY, rule_for
from servers.common.rbac import ROLES, allows

MODULES = (agents_pb2, auth_pb2, events_pb2, health_pb2, messaging_pb2, tasks_pb2, users_pb2)


def _methods() -> list[MethodDescriptor]:
    return [
        method
        for module in MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def _has_http(method: MethodDescriptor) -> bool:
    options = descriptor_pb2.MethodOptions()
    options.ParseFromString(method.GetOptions().SerializeToString())
    return options.HasExtension(annotations_pb2.http)


def test_every_rpc_of_the_contract_has_a_rule() -> None:
    paths = {_path(m) for m in _methods()}
    assert paths - set(POLICY) == set()
    assert set(POLICY) - paths == set(), "rules for RPCs that do not exist"


@pytest.mark.parametrize("method", _methods(), ids=_path)
def test_internal_exactly_when_unreachable_from_outside(method: MethodDescriptor) -> None:
    rule = rule_for(_path(method))
    internal_service = method.containing_service.name.endswith("InternalService")
    assert rule.internal == internal_service
    if internal_service:
        assert not _has_http(method), "an internal RPC must not have an HTTP binding"


def test_unknown_methods_are_refused() -> None:
    with pytest.raises(PermissionDenied):
        rule_for("/agentmesh.v1.TasksService/DropAllTables")


# Seed 004's table, walked for every role (plus anonymous) and every permissioned RPC.
EXPECTED = {
    "admin": {"read", "write", "execute", "admin"},
    "developer": {
        "agents:read",
        "agents:write",
        "agents:execute",
        "tasks:read",
        "tasks:write",
        "tasks:execute",
    },
    "user": {"tasks:read", "tasks:execute", "results:read", "results:execute"},
    "viewer": {"tasks:read", "results:read", "metrics:read"},
}


@pytest.mark.parametrize("role", [*ROLES, "anonymous"])
def test_policy_table_for_each_role(role: str) -> None:
    roles = () if role == "anonymous" else (role,)
    for path, rule in POLICY.items():
        if rule.permission is None:
            continue
        granted = allows(roles, rule.permission)
        need = rule.permission
        if role == "admin":
            assert granted, path
        elif role == "anonymous":
            assert not granted, path
        else:
            assert granted == (f"{need.resource}:{need.action}" in EXPECTED[role]), path
