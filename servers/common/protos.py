"""Small conversions between Python values and well-known proto types."""

from __future__ import annotations

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
