"""limit/offset lists: limit defaults to 50 and may be 1..100; offset is 0 or more."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ValidationError

DEFAULT_LIMIT, MAX_LIMIT, MAX_OFFSET = 50, 100, 1_000_000


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


def page(limit: int, offset: int) -> Page:
    """The page a request asks for; 0 means the default limit (proto3 cannot tell unset from 0)."""
    if limit < 0 or limit > MAX_LIMIT:
        raise ValidationError(
            f"limit must be between 1 and {MAX_LIMIT}", details={"field": "limit", "max": MAX_LIMIT}
        )
    if offset < 0 or offset > MAX_OFFSET:
        raise ValidationError("offset must be 0 or more", details={"field": "offset"})
    return Page(limit or DEFAULT_LIMIT, offset)
