"""limit/offset lists: limit defaults to 50 and may be 1..100; offset is 0 or more.

A page is also held to PAGE_MAX_BYTES of protobuf: past that, it ends early and says so with
a lower `limit`. Without the bound, a hundred tasks near their field limits (or agents with
large configurations, or messages with large payloads) make a response larger than gRPC's
4 MiB message limit; the server then fails the call with RESOURCE_EXHAUSTED, which a REST
client reads as a 429 and retries for ever."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from .errors import ValidationError

DEFAULT_LIMIT, MAX_LIMIT, MAX_OFFSET = 50, 100, 1_000_000
# A page's items, in protobuf bytes, beyond its first item (which is always served). A single
# item is bounded by its own fields' limits; a page of several stays under 1 MiB, whose JSON is
# at most a few times larger (escapes), within Envoy's 8 MiB transcoding buffer.
PAGE_MAX_BYTES = 1 << 20

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Page:
    limit: int
    offset: int

    def has_more(self, total: int) -> bool:
        return self.offset + self.limit < total

    def fields(self, total: int) -> dict[str, int | bool]:
        """The paging fields every list response carries: total, limit, offset, has_more."""
        return {
            "total": total,
            "limit": self.limit,
            "offset": self.offset,
            "has_more": self.has_more(total),
        }

    def read(self, count: int, total: int) -> Page:
        """The page that ``count`` rows read for this one make: this page, or, when the
        database cut it short (common/db.py's within_budget), one whose limit is ``count``."""
        if count < min(self.limit, total - self.offset):
            return Page(count, self.offset)
        return self

    def fit(self, items: Sequence[M]) -> tuple[Sequence[M], Page]:
        """The leading items that fit PAGE_MAX_BYTES (at least one), and the page they make:
        this one, or one whose limit is the number of items kept, so that `offset + limit` is
        where the next page starts and `has_more` stays true."""
        size = 0
        for kept, item in enumerate(items):
            size += item.ByteSize()
            if size > PAGE_MAX_BYTES and kept:
                return items[:kept], Page(kept, self.offset)
        return items, self


def page(limit: int, offset: int) -> Page:
    """The page a request asks for; 0 means the default limit (proto3 cannot tell unset from 0)."""
    if limit < 0 or limit > MAX_LIMIT:
        raise ValidationError(
            f"limit must be between 1 and {MAX_LIMIT}", details={"field": "limit", "max": MAX_LIMIT}
        )
    if offset < 0 or offset > MAX_OFFSET:
        raise ValidationError(
            f"offset must be between 0 and {MAX_OFFSET}",
            details={"field": "offset", "max": MAX_OFFSET},
        )
    return Page(limit or DEFAULT_LIMIT, offset)
