"""Open streams counted per key (a user, an agent) against a limit, in one process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .errors import RateLimited

RETRY_AFTER = 5  # seconds a refused client waits before asking again


class StreamSlots:
    """A stream holds a slot of its key while it is open; one more than ``limit`` is 429
    RATE_LIMIT_EXCEEDED ("at most N open WHAT; close one first"). ``what`` names the streams
    and the key, e.g. "event streams per user"."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self._what = what
        self._open: dict[str, int] = {}

    @contextlib.contextmanager
    def take(self, key: str) -> Iterator[None]:
        open_now = self._open.get(key, 0)
        if open_now >= self.limit:
            raise RateLimited(
                f"at most {self.limit} open {self._what}; close one first",
                details={"limit": self.limit, "retry_after": RETRY_AFTER},
            )
        self._open[key] = open_now + 1
        try:
            yield
        finally:
            left = self._open.pop(key, 1) - 1
            if left:
                self._open[key] = left
