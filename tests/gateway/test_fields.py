"""The table of body fields the edge's Lua filter checks (gateway/fields.py), against the
contract itself."""

from __future__ import annotations

import pytest

from gateway.fields import _pattern, routes
from gateway.proxy import DESCRIPTOR


def test_path_templates_become_anchored_lua_patterns() -> None:
    # With an optional trailing slash, which the transcoder routes as the path without.
    assert _pattern("/api/v1/tasks") == "^/api/v1/tasks/?$"
    assert _pattern("/api/v1/auth/change-password") == "^/api/v1/auth/change%-password/?$"
    assert _pattern("/api/v1/agents/{agent_id}/tasks/{task_id}/complete") == (
        "^/api/v1/agents/[^/]+/tasks/[^/]+/complete/?$"
    )
    assert _pattern("/v1/{name=**}:run") == "^/v1/.+:run/?$"
    with pytest.raises(ValueError, match="not supported"):
        _pattern("/v1/{name=shelves/*}")


def test_every_route_has_its_body_fields_in_both_spellings_and_its_bound_fields() -> None:
    rows = {(r.verb, r.pattern): r for r in routes(DESCRIPTOR)}
    create = rows[("POST", "^/api/v1/tasks/?$")]
    assert create.body == "*" and create.names is not None
    assert {"description", "priority", "metadata", "idempotency_key", "idempotencyKey"} <= set(
        create.names
    )
    # Lists are marked; a Struct (metadata) is a value, like a scalar; both spellings name
    # the proto field.
    names = create.names
    assert (
        names["required_capabilities"]
        == names["requiredCapabilities"]
        == ("list:required_capabilities")
    )
    assert names["metadata"] == "value:metadata"
    assert names["maxAttempts"] == names["max_attempts"] == "value:max_attempts"
    assert rows[("POST", "^/api/tasks/?$")].names == names  # seed 001's alias, the same request
    tier = rows[("PUT", "^/api/v1/users/[^/]+/tier/?$")]
    assert tier.names == {
        "tier": "value:tier",
        "user_id": "value:user_id",
        "userId": "value:user_id",
    }
    assert tier.bound_fields == ("userId", "user_id")
    # The config PATCH binds one field (a Struct) as its body: nothing to check at the top,
    # but the body must still be strict JSON, and a query parameter may not name that field.
    config = rows[("PATCH", "^/api/v1/agents/[^/]+/config/?$")]
    assert (config.body, config.names) == ("field", None)
    assert set(config.bound_fields) == {"agent_id", "agentId", "configuration"}
    # Bodiless bindings refuse a body.
    cancel = rows[("DELETE", "^/api/v1/tasks/[^/]+/?$")]
    assert (cancel.body, cancel.bound_fields) == ("none", ("taskId", "task_id"))
    assert rows[("GET", "^/api/v1/tasks/?$")].bound_fields == ()
