"""Recently read accounts, so that GetMe and ValidateToken need no database read each time.

The auth service is the only writer of accounts: each of its writes forgets the entry once the
write has committed, so this process never serves a stale profile after its own change. Writes by
another process (a second auth replica, `agentmesh grant-role`) show within ``ttl`` seconds, well
inside the documented bound for roles and the disabled flag (the next refresh). Credentials are
never served from here: API keys and refresh tokens are checked in the database every time.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from .models import UserRow


class ProfileCache:
    def __init__(self, *, ttl: float = 2.0, size: int = 10_000) -> None:
        self._ttl = ttl
        self._size = size
        self._rows: OrderedDict[str, tuple[UserRow, float]] = OrderedDict()

    def get(self, user_id: str) -> UserRow | None:
        entry = self._rows.get(user_id)
        if entry is None:
            return None
        row, expires = entry
        if time.monotonic() >= expires:
            del self._rows[user_id]
            return None
        return row

    def put(self, row: UserRow) -> None:
        self._rows[row.id] = (row, time.monotonic() + self._ttl)
        self._rows.move_to_end(row.id)
        if len(self._rows) > self._size:
            self._rows.popitem(last=False)

    def forget(self, user_id: str) -> None:
        """Called after a write to the account has committed."""
        self._rows.pop(user_id, None)
