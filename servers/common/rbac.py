"""Roles and permissions of seed 004, and the check every RPC's policy uses."""

from __future__ import annotations

from dataclasses import dataclass

# Seed 004's RBAC table: role -> (permissions, resources).
ROLES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "admin": (frozenset({"*"}), frozenset({"*"})),
    "developer": (
        frozenset({"read", "write", "execute"}),
        frozenset({"agents", "tasks", "workflows"}),
    ),
    "user": (frozenset({"read", "execute"}), frozenset({"tasks", "results"})),
    "viewer": (frozenset({"read"}), frozenset({"tasks", "results", "metrics"})),
}
DEFAULT_ROLES = ("user",)


@dataclass(frozen=True)
class Permission:
    """An action on a kind of resource, e.g. Permission("execute", "tasks")."""

    action: str
    resource: str


# What the `agent` API-key scope needs of its owner's roles: to be allowed to run agents.
AGENT_PERMISSION = Permission("write", "agents")


def permissions_of(roles: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The flat permission words of some roles, as the `permissions` JWT claim carries them."""
    words: set[str] = set()
    for role in roles:
        if role in ROLES:
            words |= ROLES[role][0]
    return tuple(sorted(words))


def allows(roles: tuple[str, ...], needed: Permission) -> bool:
    """Whether any of the roles grants the permission."""
    for role in roles:
        actions, resources = ROLES.get(role, (frozenset(), frozenset()))
        if ("*" in actions or needed.action in actions) and (
            "*" in resources or needed.resource in resources
        ):
            return True
    return False
