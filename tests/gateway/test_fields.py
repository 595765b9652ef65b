"""The table of body fields the edge's Lua filter checks (gateway/fields.py), against the
contract itself."""

from __future__ import annotations

import pytest

from gateway.fields import _pattern, body_fields
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


def test_every_route_with_a_json_body_has_its_fields_in_both_spellings() -> None:
    rows = {(verb, pattern): names for verb, pattern, names in body_fields(DESCRIPTOR)}
    create = rows[("POST", "^/api/v1/tasks/?$")]
    assert create is not None
    assert {"description", "priority", "metadata", "idempotency_key", "idempotencyKey"} <= set(
        create
    )
    # Lists are marked; a Struct (metadata) is a value, like a scalar.
    assert create["required_capabilities"] == create["requiredCapabilities"] == "list"
    assert create["metadata"] == create["priority"] == "value"
    assert rows[("POST", "^/api/tasks/?$")] == create  # seed 001's alias, the same request
    assert rows[("PUT", "^/api/v1/users/[^/]+/tier/?$")] == {
        "tier": "value",
        "user_id": "value",
        "userId": "value",
    }
    # The config PATCH binds one field (a Struct) as its body: nothing to check at the top,
    # but the body must still be strict JSON.
    assert rows[("PATCH", "^/api/v1/agents/[^/]+/config/?$")] is None
    # Bodiless bindings (DELETE) have no row.
    assert not any(verb == "DELETE" for verb, _ in rows)
