"""Server-Sent Events written by the server itself and passed through Envoy untouched.

An RPC that returns ``stream google.api.HttpBody`` with content type ``text/event-stream`` reaches
the REST client byte for byte (see DESIGN.md, "Streams instead of WebSockets"), so the server
writes the `id:`, `event:`, `retry:` and keepalive lines a browser's EventSource needs to resume.
"""

from __future__ import annotations

import json
from typing import Any

from google.api import httpbody_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

CONTENT_TYPE = "text/event-stream"
# The request header a reconnecting EventSource sends; Envoy passes it on as gRPC metadata.
LAST_EVENT_ID = "last-event-id"


def _clean(value: str) -> str:
    # A field value must not break the frame: no line breaks in ids and event names.
    return value.replace("\r", " ").replace("\n", " ")


def _integral(value: Any) -> Any:
    """JSON numbers as the transcoder prints them: a google.protobuf.Value holds a double, and
    a whole one is written without its ".0"."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def frame(event: str, message: Message, *, event_id: str = "") -> str:
    """One SSE frame: optional `id:`, `event:`, and the message as one line of JSON, printed
    as the transcoder prints unary replies (envoy.yaml's print_options)."""
    fields = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    data = json.dumps(_integral(fields), separators=(",", ":"), ensure_ascii=False)
    head = f"id: {_clean(event_id)}\n" if event_id else ""
    return f"{head}event: {_clean(event)}\ndata: {data}\n\n"


def retry(milliseconds: int) -> str:
    """Tells the client how long to wait before reconnecting."""
    return f"retry: {int(milliseconds)}\n\n"


def comment(text: str) -> str:
    """A comment line, ignored by clients; keeps idle connections alive through proxies."""
    return f": {_clean(text)}\n\n"


def body(text: str) -> httpbody_pb2.HttpBody:
    """Frames as one chunk of the HttpBody stream."""
    return httpbody_pb2.HttpBody(content_type=CONTENT_TYPE, data=text.encode())
