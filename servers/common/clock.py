"""Time as the services store and send it: aware UTC datetimes, proto Timestamps."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2


def now() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime) -> datetime:
    """SQLite hands timestamps back without their zone; they were written in UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A proto Timestamp, or None (an unset field) for a missing time."""
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(aware(value))
    return ts
