"""The JSON fields each REST route's body may have, for the edge's Lua filter.

Envoy's gRPC-JSON transcoder follows the proto3 JSON mapping, which ignores fields it does not
know: `{"prority": 9}` would create a task of the default priority and answer 201. The edge
refuses such a body with 400 VALIDATION_ERROR instead (gateway/edge.lua), from this table: for
every HTTP binding with a body, its verb, its path template as an anchored Lua pattern (which,
as the transcoder does, also takes the path with a trailing slash), and for `body: "*"` the
request message's field names as the transcoder accepts them (proto and JSON spellings), each
marked "list" when it is a repeated field: protobuf's JSON parser takes a lone value for a list
of one (`"required_capabilities": "echo"`), which no client means. Only the top level is
checked: a google.protobuf.Struct (metadata) holds what its writer likes. A binding of one field
(`body: "configuration"`) has no names: its body must only be strict JSON, as every checked
body must (protobuf's parser would also take single quotes, bare keys, trailing commas).

The table is made from the descriptor set at the moment Envoy's configuration is written, so it
cannot drift from the contract.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

PACKAGE = "agentmesh.v1"
_VERBS = ("get", "put", "post", "delete", "patch")
_LUA_MAGIC = re.compile(r"([\^$()%.\[\]*+\-?])")
_VARIABLE = re.compile(r"\{([^}=]+)(?:=([^}]*))?\}")


def _pattern(template: str) -> str:
    """An anchored Lua pattern for a google.api.http path template, with or without a trailing
    slash (the transcoder routes `/api/v1/tasks/` as `/api/v1/tasks`)."""
    out, at = [], 0
    for match in _VARIABLE.finditer(template):
        bound = match.group(2) or "*"
        if bound not in ("*", "**"):
            # A variable bound to a sub-path (`{name=shelves/*}`): no route has one; a new one
            # must be taught here rather than checked against the wrong pattern.
            raise ValueError(f"path template {template!r}: {match.group(0)} is not supported")
        out.append(_LUA_MAGIC.sub(r"%\1", template[at : match.start()]))
        out.append(".+" if bound == "**" else "[^/]+")
        at = match.end()
    out.append(_LUA_MAGIC.sub(r"%\1", template[at:]))
    return "^" + "".join(out) + "/?$"


def _collect(
    scope: str,
    found: Iterable[descriptor_pb2.DescriptorProto],
    into: dict[str, descriptor_pb2.DescriptorProto],
) -> None:
    """Every message by its full name, nested ones (map entries among them) included."""
    for message in found:
        name = f"{scope}.{message.name}"
        into[name] = message
        _collect(name, message.nested_type, into)


def _is_list(
    field: descriptor_pb2.FieldDescriptorProto, messages: dict[str, descriptor_pb2.DescriptorProto]
) -> bool:
    """A repeated field that is not a map (a map is a repeated entry message, and an object)."""
    if field.label != descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        return False
    entry = messages.get(field.type_name)
    return entry is None or not entry.options.map_entry


def _bindings(rule: http_pb2.HttpRule) -> Iterator[tuple[str, str, str]]:
    for binding in (rule, *rule.additional_bindings):
        verb = binding.WhichOneof("pattern")
        if verb in _VERBS:
            yield verb.upper(), getattr(binding, verb), binding.body


Row = tuple[str, str, dict[str, str] | None]


def body_fields(descriptor: Path) -> list[Row]:
    """(verb, Lua pattern, {accepted field name: "list" or "value"}) of every route with a
    body; None instead of the names where the body is one field of the request."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes()).file
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}
    for file in files:
        _collect(f".{file.package}", file.message_type, messages)
    rows: list[Row] = []
    for file in files:
        if file.package != PACKAGE:
            continue
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                for verb, path, body in _bindings(rule):
                    if not body:
                        continue
                    if body != "*":
                        rows.append((verb, _pattern(path), None))
                        continue
                    names: dict[str, str] = {}
                    for field in messages[method.input_type].field:
                        kind = "list" if _is_list(field, messages) else "value"
                        names[field.name] = names[field.json_name] = kind
                    rows.append((verb, _pattern(path), dict(sorted(names.items()))))
    return rows


def lua_table(descriptor: Path) -> str:
    """The table as Lua source: ``BODY_FIELDS = {{verb, pattern, {name = kind, ...}}, ...}``,
    with ``false`` for the names of a one-field body."""
    lines = ["-- Generated by gateway/fields.py from the descriptor set; see its docstring.", ""]
    lines.append("BODY_FIELDS = {")
    for verb, pattern, names in body_fields(descriptor):
        if names is None:
            lines.append(f'  {{"{verb}", "{pattern}", false}},')
            continue
        allowed = ", ".join(f'["{name}"] = "{kind}"' for name, kind in names.items())
        lines.append(f'  {{"{verb}", "{pattern}", {{{allowed}}}}},')
    lines.append("}")
    return "\n".join(lines) + "\n\n"
