"""AccountCache: entries expire, writes forget them, memory is bounded."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from servers.auth.apikeys import principal_of
from servers.auth.models import ApiKeyRow, UserRow
from servers.auth.profiles import AccountCache

FAR = time.time() + 3600


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


def _key(user: UserRow, key_id: str) -> ApiKeyRow:
    return ApiKeyRow(
        key_id=key_id,
        user_id=user.id,
        name=key_id,
        prefix="amk_",
        key_hash=key_id,
        scopes=["read"],
        created_at=user.created_at,
    )


def _remember(
    cache: AccountCache, key_id: str, user: UserRow, *, until: float = FAR, epoch: int | None = None
) -> None:
    key = _key(user, key_id)
    epoch = cache.epoch if epoch is None else epoch
    cache.put_key(key_id, user, key, principal_of(user, key), until=until, epoch=epoch)


def test_profiles_expire_and_are_forgotten() -> None:
    cache = AccountCache(ttl=0.2)
    cache.put_profile(_user("a"), cache.epoch)
    assert cache.profile("a") is not None
    cache.forget_user("a")
    assert cache.profile("a") is None
    cache.put_profile(_user("a"), cache.epoch)
    time.sleep(0.25)
    assert cache.profile("a") is None


def test_forgetting_a_user_forgets_its_keys() -> None:
    cache = AccountCache()
    a, b = _user("a"), _user("b")
    _remember(cache, "ka1", a)
    _remember(cache, "ka2", a)
    _remember(cache, "kb", b)
    cache.forget_key("ka1", "a")
    assert cache.key("ka1") is None and cache.key("ka2") is not None
    cache.forget_user("a")
    assert cache.key("ka2") is None and cache.key("kb") is not None


def test_size_is_bounded() -> None:
    cache = AccountCache(size=2)
    users = [_user(name) for name in ("a", "b", "c")]
    for user in users:
        cache.put_profile(user, cache.epoch)
        _remember(cache, user.id, user)
    assert cache.profile("a") is None and cache.profile("c") is not None
    assert cache.key("a") is None and cache.key("c") is not None


def test_a_read_that_raced_a_write_is_not_kept() -> None:
    cache = AccountCache()
    a = _user("a")
    before = cache.epoch  # a reader starts its database read...
    cache.forget_key("ka", "a")  # ...the key's revocation commits meanwhile...
    _remember(cache, "ka", a, epoch=before)  # ...and the reader's old row arrives.
    assert cache.key("ka") is None


def test_a_key_is_not_remembered_past_its_own_expiry() -> None:
    cache = AccountCache(ttl=60)
    a = _user("a")
    _remember(cache, "ka", a, until=time.time() + 0.1)
    assert cache.key("ka") is not None
    time.sleep(0.15)
    assert cache.key("ka") is None
