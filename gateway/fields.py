"""What the edge's Lua filter checks of each REST route's request, from the contract.

Envoy's gRPC-JSON transcoder follows the proto3 JSON mapping, which ignores fields it does not
know: `{"prority": 9}` would create a task of the default priority and answer 201. The edge
refuses such a body with 400 VALIDATION_ERROR instead (gateway/edge.lua), from this table: for
every HTTP binding, its verb, its path template as an anchored Lua pattern (which, as the
transcoder does, also takes the path with a trailing slash), and
- for `body: "*"`, the request message's field names as the transcoder accepts them (proto and
  JSON spellings), each marked "list" when it is a repeated field (protobuf's JSON parser takes
  a lone value for a list of one, `"required_capabilities": "echo"`, which no client means), and
  with its proto name, so that one field given in both spellings is refused. Only the top level
  is checked: a google.protobuf.Struct (metadata) holds what its writer likes. Such a route
  takes no query parameters: every field is the body's.
- a binding of one field (`body: "configuration"`) has no names: its body must only be strict
  JSON, as every checked body must (protobuf's parser would also take single quotes, bare keys,
  trailing commas).
- a binding without a body refuses one: the transcoder would read a GET's body into the request
  without any of these checks.
- and for each, the fields its path binds: a query parameter naming one (`DELETE
  /api/v1/tasks/A?task_id=B`) would override the path, and act on B while every log says A.

The table is made from the descriptor set at the moment Envoy's configuration is written, so it
cannot drift from the contract.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Route:
    """What the edge checks of one HTTP binding. ``body``: "*" (the request's fields, named in
    ``names``, each "list" or "value" with its proto name: "list:required_capabilities"),
    "field" (one field is the body: only its syntax is checked) or "none" (a body is refused).
    ``bound_fields``: the fields the path binds, and a one-field body's field, in both
    spellings, which no query parameter may name (the transcoder would let it override them).
    """

    verb: str
    pattern: str
    body: str
    names: dict[str, str] | None
    bound_fields: tuple[str, ...]
    # Every field of the request in both spellings, as ``names`` has them, whatever the body:
    # a query parameter may name a value field once (the transcoder would take the last).
    fields: dict[str, str] | None = None


def routes(descriptor: Path) -> list[Route]:
    """Every HTTP binding of the contract's services, in the order of the descriptor set."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes()).file
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}
    for file in files:
        _collect(f".{file.package}", file.message_type, messages)
    rows: list[Route] = []
    for file in files:
        if file.package != PACKAGE:
            continue
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                fields = messages[method.input_type].field
                spellings = {f.name: (f.name, f.json_name) for f in fields}
                for verb, path, body in _bindings(rule):
                    bound = [m.group(1).split(".")[0] for m in _VARIABLE.finditer(path)]
                    if body not in ("", "*"):
                        bound.append(body.split(".")[0])
                    bound_fields = sorted({n for b in bound for n in spellings.get(b, (b,))})
                    names = {}
                    for field in fields:
                        kind = "list" if _is_list(field, messages) else "value"
                        names[field.name] = names[field.json_name] = f"{kind}:{field.name}"
                    every = dict(sorted(names.items()))
                    if body != "*":
                        kind = "field" if body else "none"
                        rows.append(
                            Route(verb, _pattern(path), kind, None, tuple(bound_fields), every)
                        )
                        continue
                    rows.append(Route(verb, _pattern(path), "*", every, tuple(bound_fields), every))
    # The transcoder prefers a literal segment to a variable (`/agents/register` over
    # `/agents/{agent_id}`), and the edge takes the first rule that matches: the fewest
    # variables first.
    return sorted(rows, key=lambda route: route.pattern.count("[^/]+") + route.pattern.count(".+"))


def _lua_set(names: Iterable[str]) -> str:
    return "{" + ", ".join(f'["{name}"] = true' for name in names) + "}"


def _lua_map(names: dict[str, str]) -> str:
    return "{" + ", ".join(f'["{n}"] = "{k}"' for n, k in names.items()) + "}"


def lua_table(descriptor: Path) -> str:
    """The table as Lua source: ``ROUTES = {{verb, pattern, body, names, bound_fields,
    fields}, ...}``, with ``false`` for the names of a body that is not ``*``."""
    lines = ["-- Generated by gateway/fields.py from the descriptor set; see its docstring.", ""]
    lines.append("ROUTES = {")
    for route in routes(descriptor):
        names = "false" if route.names is None else _lua_map(route.names)
        lines.append(
            f'  {{"{route.verb}", "{route.pattern}", "{route.body}", {names},'
            f" {_lua_set(route.bound_fields)}, {_lua_map(route.fields or {})}}},"
        )
    lines.append("}")
    return "\n".join(lines) + "\n\n"
