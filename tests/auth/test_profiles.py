"""ProfileCache: entries expire, writes forget them, memory is bounded."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from servers.auth.models import UserRow
from servers.auth.profiles import ProfileCache


def _user(user_id: str) -> UserRow:
    at = datetime.now(UTC)
    return UserRow(
        id=user_id,
        username=user_id,
        email=f"{user_id}@x.io",
        name="",
        roles=["user"],
        disabled=False,
        created_at=at,
        updated_at=at,
    )


def test_entries_expire_and_are_forgotten() -> None:
    cache = ProfileCache(ttl=0.2)
    cache.put(_user("a"))
    assert cache.get("a") is not None
    cache.forget("a")
    assert cache.get("a") is None
    cache.put(_user("a"))
    time.sleep(0.25)
    assert cache.get("a") is None


def test_size_is_bounded() -> None:
    cache = ProfileCache(size=2)
    for name in ("a", "b", "c"):
        cache.put(_user(name))
    assert cache.get("a") is None and cache.get("c") is not None
