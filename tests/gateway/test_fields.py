"""The table of body fields the edge's Lua filter checks (gateway/fields.py), against the
contract itself."""

from __future__ import annotations

import re

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from gateway.fields import _bindings, _pattern, routes
from gateway.proxy import DESCRIPTOR, LUA


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


def test_each_unversioned_path_names_the_path_that_succeeds_it() -> None:
    """edge.lua answers seed 001's unversioned paths with the /api/v1 path to use instead: the
    twin under /api/v1/, or the path its SUCCESSOR_EXCEPTIONS table names. Both must be the
    primary binding of the same RPC; /api/observability/events/stream once named a 404."""
    exceptions = dict(re.findall(r'\["(/api/[^"]+)"\] = "([^"]+)"', LUA.read_text()))
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes()).file
    deprecated: dict[str, str] = {}
    for file in files:
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                primary, *others = [path for _, path, _ in _bindings(rule)] or [""]
                for path in others:
                    if path.startswith("/api/") and not path.startswith("/api/v1/"):
                        deprecated[path] = primary
    assert len(deprecated) >= 10, deprecated
    for path, primary in deprecated.items():
        assert exceptions.get(path, "/api/v1/" + path.removeprefix("/api/")) == primary, path
    assert set(exceptions) <= set(deprecated), "an exception for no deprecated path"
