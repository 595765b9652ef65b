"""Small conversions between Python values and well-known proto types."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import struct_pb2


def struct(value: Mapping[str, object]) -> struct_pb2.Struct:
    """A google.protobuf.Struct holding a JSON-like dict."""
    out = struct_pb2.Struct()
    out.update(value)
    return out
