"""Account changes racing each other, on each database. On PostgreSQL (READ COMMITTED, and
replicas writing side by side) a transaction that decided from a row read without a lock could
undo or miss a change committed meanwhile; SQLite's writers take turns, so there these pass by
construction. Each test slows one step of the first call so that the second lands inside it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from servers.auth import apikeys, domain
from servers.auth.admin import UserAdmin, grant_role
from servers.auth.apikeys import ApiKeys
from servers.auth.domain import Accounts, LoginLimits
from servers.auth.keys import SigningKey
from servers.auth.models import ApiKeyRow, OutboxRow
from servers.auth.profiles import AccountCache
from servers.auth.store import RefreshTokenStore, UserStore
from servers.common.context import Principal
from servers.common.db import Database
from servers.common.errors import AuthRequired, InvalidCredentials, ValidationError
from servers.common.ratelimit import SlidingWindowLimiter
from tests.tasks.test_domain import _db

PASSWORD, NEW_PASSWORD = "first-pass-123", "second-pass-456"
CLIENT = "203.0.113.7"  # the client address registrations count against
PAUSE = 0.3  # how long the slowed step waits; the other call starts after LAND
LAND = 0.1


@dataclass
class Auth:
    db: Database
    accounts: Accounts
    admin: UserAdmin
    keys: ApiKeys


def lifted_limits(per_account: int = 1000) -> LoginLimits:
    """Login limits no test here reaches, but the per-account one when it is given."""
    return LoginLimits(
        per_address=SlidingWindowLimiter(name="a", limit=1000, window=3600),
        per_account=SlidingWindowLimiter(name="b", limit=per_account, window=3600),
        registrations=SlidingWindowLimiter(name="r", limit=1000, window=3600),
    )


def build_auth(db: Database, tmp_path: Path, limits: LoginLimits) -> Auth:
    """The auth service's parts on ``db``, sharing one account cache."""
    cache = AccountCache()
    accounts = Accounts(
        db=db,
        key=SigningKey.load_or_create(tmp_path),
        issuer="agentmesh",
        audience="agentmesh",
        access_ttl=900,
        limits=limits,
        cache=cache,
    )
    return Auth(
        db, accounts, UserAdmin(db=db, cache=cache, access_ttl=900), ApiKeys(db=db, cache=cache)
    )


@pytest.fixture
async def auth(database_url: str, tmp_path: Path) -> AsyncIterator[Auth]:
    db = await _db(database_url)
    limits = lifted_limits()
    yield build_auth(db, tmp_path, limits)
    await limits.close()
    await db.close()


def _slowed(monkeypatch: pytest.MonkeyPatch, owner: type, name: str, *, when: Any = None) -> None:
    """Makes ``owner.name`` pause after it returns (once, and only for calls ``when`` accepts)."""
    original = getattr(owner, name)
    done = False

    async def slow(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal done
        result = await original(self, *args, **kwargs)
        if not done and (when is None or when(*args, **kwargs)):
            done = True
            await asyncio.sleep(PAUSE)
        return result

    monkeypatch.setattr(owner, name, slow)


async def _inside(first: Awaitable[Any], second: Callable[[], Awaitable[Any]]) -> Any:
    """Runs ``first``; ``second`` starts while first's slowed step waits. Returns first's
    result (or raises its error) once both are done."""
    started = asyncio.ensure_future(first)
    await asyncio.sleep(LAND)
    await second()
    return await started


def _user(tokens: domain.IssuedTokens) -> Principal:
    user = tokens.user
    return Principal(subject=user.id, kind="user", username=user.username, roles=tuple(user.roles))


async def _events(db: Database, event_type: str) -> int:
    async with db.session() as s:
        found = await s.execute(
            select(func.count()).select_from(OutboxRow).where(OutboxRow.event_type == event_type)
        )
        return int(found.scalar_one())


async def test_a_password_change_ends_the_session_a_concurrent_refresh_renewed(
    auth: Auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresh has spent the old token and is issuing the new one when the password
    changes: the new token must be revoked with the others, not outlive the change."""
    signed_up = await auth.accounts.register(
        client=CLIENT, email="ada@example.com", password=PASSWORD
    )
    _slowed(monkeypatch, RefreshTokenStore, "spend")

    renewed = await _inside(
        auth.accounts.refresh(signed_up.refresh_token),
        lambda: auth.accounts.change_password(_user(signed_up), current=PASSWORD, new=NEW_PASSWORD),
    )
    with pytest.raises(AuthRequired):
        await auth.accounts.refresh(renewed.refresh_token)


async def test_a_sign_out_ends_the_session_a_concurrent_refresh_renewed(
    auth: Auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresh has spent the session's token and is issuing the new one when the session
    signs out: the new token must be revoked with its family, not carry the session on."""
    signed_up = await auth.accounts.register(
        client=CLIENT, email="ada@example.com", password=PASSWORD
    )
    _slowed(monkeypatch, RefreshTokenStore, "spend")

    renewed = await _inside(
        auth.accounts.refresh(signed_up.refresh_token),
        lambda: auth.accounts.logout(_user(signed_up), signed_up.refresh_token),
    )
    with pytest.raises(AuthRequired):
        await auth.accounts.refresh(renewed.refresh_token)


async def test_a_sign_in_with_the_password_just_changed_is_refused(
    auth: Auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old password was checked, then the password changed before the sign-in wrote its
    session: the sign-in must fail rather than hand out a session the change never revoked."""
    signed_up = await auth.accounts.register(
        client=CLIENT, email="ada@example.com", password=PASSWORD
    )
    checked, changed = threading.Event(), threading.Event()
    verify = domain._verify

    def gated(stored: str, password: str) -> bool:
        # The first check (the sign-in's) waits until the password has changed.
        if not checked.is_set():
            checked.set()
            changed.wait(5)
        return verify(stored, password)

    monkeypatch.setattr(domain, "_verify", gated)
    signing_in = asyncio.ensure_future(
        auth.accounts.login(login="ada@example.com", password=PASSWORD, client="127.0.0.1")
    )
    await asyncio.to_thread(checked.wait, 5)
    await auth.accounts.change_password(_user(signed_up), current=PASSWORD, new=NEW_PASSWORD)
    changed.set()
    with pytest.raises(InvalidCredentials):
        await signing_in


async def test_two_password_changes_from_the_same_password_one_wins(auth: Auth) -> None:
    """Both knew the current password; once one has changed it, the other's `current` is
    wrong, and its new password must not replace the first one's."""
    signed_up = await auth.accounts.register(
        client=CLIENT, email="ada@example.com", password=PASSWORD
    )
    who = _user(signed_up)
    results = await asyncio.gather(
        auth.accounts.change_password(who, current=PASSWORD, new=NEW_PASSWORD),
        auth.accounts.change_password(who, current=PASSWORD, new="third-pass-789"),
        return_exceptions=True,
    )
    assert sum(isinstance(r, InvalidCredentials) for r in results) == 1
    winner = "third-pass-789" if isinstance(results[0], InvalidCredentials) else NEW_PASSWORD
    signed_in = await auth.accounts.login(
        login="ada@example.com", password=winner, client="127.0.0.1"
    )
    assert signed_in.user.id == signed_up.user.id


async def test_a_sign_out_during_a_refresh_is_not_taken_for_a_stolen_token(
    auth: Auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user signs out while a refresh of the same session is under way: the refresh fails
    as a revoked token would, without the token-reuse alarm of a replay."""
    signed_up = await auth.accounts.register(
        client=CLIENT, email="ada@example.com", password=PASSWORD
    )
    _slowed(monkeypatch, RefreshTokenStore, "get", when=lambda *a, **kw: not kw.get("lock"))

    try:
        await _inside(
            auth.accounts.refresh(signed_up.refresh_token),
            lambda: auth.accounts.logout(_user(signed_up), signed_up.refresh_token),
        )
    except AuthRequired as exc:  # PostgreSQL: the sign-out committed first
        assert exc.message == "invalid refresh token"
    # (On SQLite the sign-out waits for the refresh's transaction: the refresh succeeds.)
    assert await _events(auth.db, "security.refresh_token_reuse") == 0


async def test_granting_a_role_does_not_bring_back_one_just_taken_away(
    auth: Auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = await auth.accounts.register(client=CLIENT, email="root@example.com", password=PASSWORD)
    await grant_role(auth.db, "root@example.com", "admin")
    bob = await auth.accounts.register(client=CLIENT, email="bob@example.com", password=PASSWORD)
    await grant_role(auth.db, "bob@example.com", "admin")
    _slowed(monkeypatch, UserStore, "find_login")

    await _inside(
        grant_role(auth.db, "bob@example.com", "viewer"),
        lambda: auth.admin.set_roles(
            Principal(subject=admin.user.id, kind="user", roles=("admin", "user")),
            bob.user.id,
            ["user"],
        ),
    )
    async with auth.db.session() as s:
        final = await UserStore(s).get(bob.user.id)
    assert final is not None and "admin" not in final.roles


async def test_concurrent_key_creates_keep_to_the_cap(
    auth: Auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(apikeys, "MAX_KEYS_PER_USER", 3)
    signed_up = await auth.accounts.register(
        client=CLIENT, email="ada@example.com", password=PASSWORD
    )
    who = _user(signed_up)
    for n in range(2):
        await auth.keys.create(who, name=f"key-{n}", scopes=["read"], expires_at=None)
    original = apikeys.ApiKeyStore.count_active

    async def slow_count(self: Any, user_id: str) -> int:
        counted = await original(self, user_id)
        await asyncio.sleep(PAUSE)  # both creates count before either inserts, unless locked
        return counted

    monkeypatch.setattr(apikeys.ApiKeyStore, "count_active", slow_count)
    results = await asyncio.gather(
        *(
            auth.keys.create(who, name=f"late-{n}", scopes=["read"], expires_at=None)
            for n in range(2)
        ),
        return_exceptions=True,
    )
    assert sum(isinstance(r, ValidationError) for r in results) == 1
    async with auth.db.session() as s:
        active = await s.execute(
            select(func.count()).select_from(ApiKeyRow).where(ApiKeyRow.user_id == who.subject)
        )
    assert active.scalar_one() == 3


async def test_two_sign_ups_whose_addresses_give_one_username_both_succeed(
    auth: Auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both derive "ada" from their e-mail address at once: the second must take another name,
    not fail on the first's "ada" as if its own account existed."""
    _slowed(monkeypatch, UserStore, "exists")
    first = await _inside(
        auth.accounts.register(client=CLIENT, email="ada@one.example", password=PASSWORD),
        lambda: auth.accounts.register(client=CLIENT, email="ada@two.example", password=PASSWORD),
    )
    async with auth.db.session() as s:
        names = {u.email: u.username for u in (await UserStore(s).page(limit=10, offset=0))[0]}
    assert names["ada@one.example"] == first.user.username
    assert len(set(names.values())) == 2 and "ada" in names.values()
