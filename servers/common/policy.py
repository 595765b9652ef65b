"""The access policy: one rule for every RPC of the contract, in one table.

A rule says who may call: anyone (public), any signed-in principal, principals whose roles grant
a permission of seed 004's RBAC table, agents (API keys with the `agent` scope), or only other
services of the mesh (internal). Object-level checks (a user sees only its own tasks) are the
services' job on top of this. tests/common/test_policy.py checks that every RPC of the contract
has a rule, and walks the table with every role.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PermissionDenied
from .rbac import Permission


@dataclass(frozen=True)
class Rule:
    public: bool = False
    internal: bool = False
    agent: bool = False
    user_only: bool = False
    permission: Permission | None = None
    # The request quota the call counts against (quotas.py); "": not counted.
    quota: str = "general"


PUBLIC = Rule(public=True, quota="")
# Any principal: a user's access token or an API key.
SIGNED_IN = Rule()
# A user's access token only: account, session and key management are not for API keys.
USER_SESSION = Rule(user_only=True)
INTERNAL = Rule(internal=True, quota="")
# An API key with the `agent` scope.
AGENT = Rule(agent=True, quota="agent")
# Seed 004's admin ("*" on "*"); no other role and no API key scope has the "admin" action.
ADMIN = Rule(user_only=True, permission=Permission("admin", "users"), quota="management")


def needs(action: str, resource: str, *, quota: str = "general") -> Rule:
    return Rule(permission=Permission(action, resource), quota=quota)


_P = "/agentmesh.v1."

POLICY: dict[str, Rule] = {
    # Health: public, for probes and people.
    f"{_P}HealthService/GetHealth": PUBLIC,
    f"{_P}HealthService/GetLiveness": PUBLIC,
    f"{_P}HealthService/GetReadiness": PUBLIC,
    # Auth.
    f"{_P}AuthService/Register": PUBLIC,
    f"{_P}AuthService/Login": PUBLIC,
    f"{_P}AuthService/Refresh": PUBLIC,
    f"{_P}AuthService/GetJwks": PUBLIC,
    f"{_P}AuthService/GetMe": SIGNED_IN,
    f"{_P}AuthService/ValidateToken": SIGNED_IN,
    f"{_P}AuthService/Logout": USER_SESSION,
    f"{_P}AuthService/UpdateMe": USER_SESSION,
    f"{_P}AuthService/ChangePassword": USER_SESSION,
    f"{_P}AuthService/CreateApiKey": USER_SESSION,
    f"{_P}AuthService/ListApiKeys": USER_SESSION,
    f"{_P}AuthService/RevokeApiKey": USER_SESSION,
    f"{_P}AuthInternalService/VerifyApiKey": INTERNAL,
    f"{_P}AuthInternalService/ListTokenCutoffs": INTERNAL,
    # User administration: admins only, except that users read and edit their own record
    # (the service answers 404 for anyone else's).
    f"{_P}UsersService/ListUsers": ADMIN,
    f"{_P}UsersService/CreateUser": ADMIN,
    f"{_P}UsersService/GetUser": USER_SESSION,
    f"{_P}UsersService/UpdateUser": USER_SESSION,
    f"{_P}UsersService/DeleteUser": ADMIN,
    f"{_P}UsersService/SetUserRoles": ADMIN,
    f"{_P}UsersService/SetUserTier": ADMIN,
    # Tasks: seed 004's table; ownership is checked by the tasks service.
    f"{_P}TasksService/CreateTask": needs("execute", "tasks"),
    f"{_P}TasksService/ListTasks": needs("read", "tasks"),
    f"{_P}TasksService/GetTask": needs("read", "tasks"),
    # Seed 004 lists "results" for user and viewer only; read literally, a developer could
    # create a task and not read its result. A result is part of its task: read on tasks.
    f"{_P}TasksService/GetTaskResult": needs("read", "tasks"),
    f"{_P}TasksService/CancelTask": needs("execute", "tasks"),
    f"{_P}TasksService/StartTask": needs("execute", "tasks"),
    f"{_P}TasksService/StopTask": needs("execute", "tasks"),
    f"{_P}TasksService/GetStats": needs("read", "tasks", quota="monitoring"),
    f"{_P}TasksInternalService/ClaimTask": INTERNAL,
    f"{_P}TasksInternalService/RenewLeases": INTERNAL,
    f"{_P}TasksInternalService/ReportProgress": INTERNAL,
    f"{_P}TasksInternalService/CompleteTask": INTERNAL,
    f"{_P}TasksInternalService/ReleaseAgentTasks": INTERNAL,
    f"{_P}TasksInternalService/ReturnTask": INTERNAL,
    f"{_P}TasksInternalService/ListHeldTasks": INTERNAL,
    f"{_P}TasksInternalService/GetAgentFigures": INTERNAL,
    # Agents: people read and configure; the worker side is for agent-scoped API keys.
    f"{_P}AgentsService/ListAgents": needs("read", "agents"),
    f"{_P}AgentsService/GetAgent": needs("read", "agents"),
    f"{_P}AgentsService/UpdateAgentConfig": needs("write", "agents"),
    f"{_P}AgentsService/RegisterAgent": AGENT,
    f"{_P}AgentsService/Heartbeat": AGENT,
    f"{_P}AgentsService/ReportProgress": AGENT,
    f"{_P}AgentsService/CompleteTask": AGENT,
    f"{_P}AgentsService/StreamAssignments": AGENT,
    f"{_P}AgentsService/Connect": AGENT,
    f"{_P}AgentsInternalService/DeliverCancellation": INTERNAL,
    f"{_P}AgentsInternalService/NotifyTasksAvailable": INTERNAL,
    f"{_P}AgentsInternalService/ResolveAgents": INTERNAL,
    f"{_P}AgentsInternalService/CountAgents": INTERNAL,
    # Monitoring: seed 004's "metrics" resource (viewer and admin read it).
    f"{_P}MetricsService/GetMetrics": needs("read", "metrics", quota="monitoring"),
    f"{_P}MetricsService/GetPrometheusMetrics": needs("read", "metrics", quota="monitoring"),
    f"{_P}MetricsService/GetObservabilityMetrics": needs("read", "metrics", quota="monitoring"),
    f"{_P}MetricsService/ListActiveTraces": needs("read", "metrics", quota="monitoring"),
    # Inter-agent messages: agents only; from_agent is always the authenticated agent.
    f"{_P}MessagingService/SendMessage": AGENT,
    f"{_P}MessagingService/SendRequest": AGENT,
    f"{_P}MessagingService/AckMessage": AGENT,
    f"{_P}MessagingService/ListInbox": AGENT,
    f"{_P}MessagingService/StreamInbox": AGENT,
    f"{_P}MessagingService/StreamInboxSse": AGENT,
    # Events: anyone signed in; each sees only events about its own resources (admins: all).
    f"{_P}EventsService/Subscribe": SIGNED_IN,
    f"{_P}EventsService/StreamEvents": SIGNED_IN,
    f"{_P}EventsService/ListEvents": SIGNED_IN,
}

# Infrastructure services every server exposes to the mesh (probes, grpcurl).
_PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def rule_for(method: str) -> Rule:
    """The rule of a full method name; a method missing from the table is refused."""
    rule = POLICY.get(method)
    if rule is not None:
        return rule
    if method.startswith(_PUBLIC_PREFIXES):
        return PUBLIC
    raise PermissionDenied("no access rule for this RPC", details={"rpc": method})
