"""The policy table against the contract: every RPC has a rule, and the rules are the right kind."""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import MethodDescriptor

import agentmesh.v1
from servers.common.auth import Authenticator, TokenVerifier
from servers.common.context import Principal
from servers.common.errors import AuthRequired, PermissionDenied
from servers.common.policy import POLICY, rule_for
from servers.common.rbac import ROLES, allows

# Every generated module of the contract: a new service is covered without being listed here.
MODULES = tuple(
    importlib.import_module(f"agentmesh.v1.{module.name}")
    for module in pkgutil.iter_modules(agentmesh.v1.__path__)
    if module.name.endswith("_pb2")
)


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


# --- The whole matrix: every RPC x every kind of caller, through the real Authenticator. ---

CALLERS = ("anonymous", "viewer", "user", "developer", "admin", "agent key")
POLICY_DOC = Path(__file__).resolve().parents[2] / "docs" / "policy.md"


class _RoleTokens(TokenVerifier):
    """Reads a token "role:<name>" as a signed-in user with that role (the verification itself
    is tested elsewhere; this walks the rules)."""

    def __init__(self) -> None:
        super().__init__(jwks=dict, issuer="i", audience="a")

    def verify(self, token: str) -> Principal:
        return Principal(subject="u", kind="user", roles=(token.removeprefix("role:"),))


async def _agent_key(secret: str) -> Principal:
    return Principal(subject="u", kind="api_key", roles=("developer",), scopes=("agent",))


async def _verdict(auth: Authenticator, method: str, caller: str) -> str:
    metadata = {}
    if caller == "agent key":
        metadata = {"authorization": "Bearer amk_agent"}
    elif caller != "anonymous":
        metadata = {"authorization": f"Bearer role:{caller}"}
    try:
        await auth.authorize(method, metadata)
    except AuthRequired:
        return "401"
    except PermissionDenied:
        return "403"
    return "yes"


async def _matrix() -> str:
    auth = Authenticator(verifier=_RoleTokens(), internal_token="x", api_keys=_agent_key)
    lines = [
        "# Access policy",
        "",
        "Who may call each RPC, as `servers/common/policy.py` and `servers/common/auth.py` decide",
        "it (`yes`; `401` unauthenticated; `403` forbidden). Object-level rules come on top: a",
        "user sees only its own resources, and another's answer 404. Internal RPCs need the",
        "mesh's internal credential, which no caller here has. Generated and checked by",
        "`tests/common/test_policy.py` (`AGENTMESH_WRITE_POLICY_DOC=1` rewrites it).",
        "The last column is the request quota a call counts against (`servers/common/quotas.py`;",
        "`-`: not counted).",
        "",
        "| RPC | " + " | ".join(CALLERS) + " | quota |",
        "| --- |" + " --- |" * (len(CALLERS) + 1),
    ]
    for method in sorted(POLICY):
        row = [await _verdict(auth, method, caller) for caller in CALLERS]
        row.append(POLICY[method].quota or "-")
        lines.append(f"| `{method.removeprefix('/agentmesh.v1.')}` | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


async def test_policy_matrix_matches_the_document() -> None:
    table = await _matrix()
    if os.environ.get("AGENTMESH_WRITE_POLICY_DOC") == "1":
        POLICY_DOC.write_text(table)
    assert POLICY_DOC.read_text() == table, "docs/policy.md is stale; see its header"


MUTATION_VERBS = ("Create", "Update", "Delete", "Cancel", "Start", "Stop", "Set", "Register")


async def test_policy_invariants() -> None:
    """Independent of the document: what must hold whatever the table says."""
    auth = Authenticator(verifier=_RoleTokens(), internal_token="x", api_keys=_agent_key)
    for method, rule in POLICY.items():
        service, name = method.removeprefix("/agentmesh.v1.").split("/")
        verdicts = {caller: await _verdict(auth, method, caller) for caller in CALLERS}
        allowed = [caller for caller, verdict in verdicts.items() if verdict == "yes"]
        if rule.public:
            assert allowed == list(CALLERS), method
        elif rule.internal:
            assert set(verdicts.values()) == {"403"}, method
        else:
            assert verdicts["anonymous"] == "401", method
        if rule.agent:
            assert allowed == ["agent key"], method
        # A viewer changes nothing but its own account (AuthService, its own user record).
        if service in ("TasksService", "AgentsService") and name.startswith(MUTATION_VERBS):
            assert verdicts["viewer"] != "yes", method
        if service == "UsersService" and name not in ("GetUser", "UpdateUser"):
            assert allowed == ["admin"], method
