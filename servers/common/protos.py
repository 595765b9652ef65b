"""Small conversions between Python values and well-known proto types."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from .errors import ValidationError

# How deep the objects and arrays of a free-form JSON value from a client may nest: task
# metadata, a result, an agent's configuration, a message's payload. Each level costs about
# three levels of protobuf nesting (Struct, map entry, Value), and every message that carries
# the value (a task in a page, an assignment in a stream frame) adds its own. Protobuf's
# parsers and Envoy's JSON printer stop at 100 levels, so a value much deeper than this, once
# accepted, could no longer be handed to an agent or listed.
NESTING_MAX = 20


def struct(value: Mapping[str, object]) -> struct_pb2.Struct:
    """A google.protobuf.Struct holding a JSON-like dict."""
    out = struct_pb2.Struct()
    out.update(value)
    return out


def as_json(message: Message, field: str) -> dict[str, Any]:
    """A Struct from a caller as a JSON-like dict. A number JSON cannot hold (NaN, Infinity,
    which protobuf's binary form carries) is the caller's VALIDATION_ERROR, not a crash."""
    try:
        return dict(json_format.MessageToDict(message))
    except ValueError:
        raise ValidationError(
            f"{field} holds a number JSON cannot (NaN or Infinity)", details={"field": field}
        ) from None


def nesting(value: object) -> int:
    """How deep the dicts and lists of a JSON-like value nest (0 for a scalar)."""
    deepest = 0
    level: list[object] = [value]
    while level:
        inner: list[object] = []
        for item in level:
            if isinstance(item, Mapping):
                inner.extend(item.values())
            elif isinstance(item, list | tuple):
                inner.extend(item)
        if not inner and not any(isinstance(i, Mapping | list | tuple) for i in level):
            break
        deepest += 1
        level = inner
    return deepest


def too_deep(value: object) -> bool:
    return nesting(value) > NESTING_MAX


def json_size(value: object) -> int:
    """The bytes of a JSON-like value as compact UTF-8 JSON, the measure of every size limit on
    free-form values: a character takes the bytes it takes on the wire (three for 日), not the
    six of a \\u escape."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return len(text.encode("utf-8", "surrogatepass"))


# JSON values (Struct, Value, ListValue) are stored as JSON, where a NUL is an escape like any
# other; only text fields are checked.
_JSON_TYPES = frozenset(
    {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
)


def nul_field(message: Message, prefix: str = "") -> str | None:
    """The path of the first text field of ``message`` (nested messages, repeated fields and
    maps included; JSON values not) that holds a NUL character, or None. PostgreSQL's text
    cannot hold one, and no name, description or reason needs one."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.type == field.TYPE_STRING:
            texts = value if field.is_repeated else (value,)
            if any("\x00" in text for text in texts):
                return path
        elif field.type == field.TYPE_MESSAGE:
            kind = field.message_type
            if kind.full_name in _JSON_TYPES:
                continue
            if kind.GetOptions().map_entry:
                found = _nul_in_map(kind, value, path)
            elif field.is_repeated:
                found = next(
                    (f for n, item in enumerate(value) if (f := nul_field(item, f"{path}[{n}]."))),
                    None,
                )
            else:
                found = nul_field(value, f"{path}.")
            if found:
                return found
    return None


def _nul_in_map(entry: Any, value: Any, path: str) -> str | None:
    key_is_text = entry.fields_by_name["key"].type == entry.fields_by_name["key"].TYPE_STRING
    holds = entry.fields_by_name["value"]
    for key, item in value.items():
        if key_is_text and "\x00" in key:
            return path
        if holds.type == holds.TYPE_STRING and "\x00" in item:
            return f"{path}.{key}"
        if holds.type == holds.TYPE_MESSAGE and holds.message_type.full_name not in _JSON_TYPES:
            found = nul_field(item, f"{path}.{key}.")
            if found:
                return found
    return None
