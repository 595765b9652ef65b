"""The audit's findings on the auth service, at the domain level, on each database: one login
budget per account (also spent by ChangePassword), a disabled account's token managing no
credentials, one account per e-mail address in any Unicode form, and sign-out by refresh token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection

from servers.auth.admin import grant_role
from servers.auth.domain import IssuedTokens, LoginLimits, hash_password
from servers.auth.store import UserStore
from servers.common.clock import now
from servers.common.context import Principal
from servers.common.db import Database
from servers.common.errors import (
    AuthRequired,
    InvalidCredentials,
    RateLimited,
    UserExists,
    ValidationError,
)
from servers.common.pagination import page
from servers.mesh import MIGRATIONS
from tests.auth.test_races import Auth, build_auth, lifted_limits
from tests.tasks.test_domain import _db

LIMIT = 4  # the per-account login limit here (the mesh's default is 10)
PASSWORD = "first-pass-123"
CLIENT = "203.0.113.7"  # the client address registrations count against


def _limits() -> LoginLimits:
    # Every test signs in from addresses of its own choosing; only the account's limit bites.
    return lifted_limits(per_account=LIMIT)


@pytest.fixture
async def auth(database_url: str, tmp_path: Path) -> AsyncIterator[Auth]:
    db = await _db(database_url)
    limits = _limits()
    yield build_auth(db, tmp_path, limits)
    await limits.close()
    await db.close()


def _who(tokens: IssuedTokens) -> Principal:
    user = tokens.user
    return Principal(subject=user.id, kind="user", username=user.username, roles=tuple(user.roles))


async def _admin(auth: Auth, email: str) -> Principal:
    signed_up = await auth.accounts.register(client=CLIENT, email=email, password=PASSWORD)
    await grant_role(auth.db, email, "admin")
    return Principal(subject=signed_up.user.id, kind="user", roles=("admin", "user"))


# 1. The per-account login limit counts the account, not the login string.


async def test_every_spelling_of_an_account_spends_one_login_budget(auth: Auth) -> None:
    dave = await auth.accounts.register(
        client=CLIENT, username="dave", email="dave@example.com", password=PASSWORD
    )
    spellings = ["dave", "dave@example.com", "DAVE", "Dave@Example.COM", "\uff44ave"]
    for n in range(LIMIT):
        with pytest.raises(InvalidCredentials):
            await auth.accounts.login(
                login=spellings[n % len(spellings)], password="wrong-pass-1", client=f"10.0.0.{n}"
            )
    # The budget is spent: another spelling, another address, even the right password.
    for login in spellings:
        with pytest.raises(RateLimited) as refused:
            await auth.accounts.login(login=login, password=PASSWORD, client="10.0.1.1")
        assert 0 < int(refused.value.details["retry_after"]) <= 3600
    assert dave.user.username == "dave"


async def test_a_login_naming_no_account_is_limited_the_same_way(auth: Auth) -> None:
    for n in range(LIMIT):
        with pytest.raises(InvalidCredentials):
            await auth.accounts.login(
                login="ghost@example.com", password="wrong-pass-1", client=f"10.0.0.{n}"
            )
    for login in ("ghost@example.com", "GHOST@example.com", "\uff47host@example.com"):
        with pytest.raises(RateLimited):
            await auth.accounts.login(login=login, password="wrong-pass-1", client="10.0.1.1")
    # A login no account can have is an unknown account, not a database error (PostgreSQL's
    # text refuses NUL).
    with pytest.raises(InvalidCredentials):
        await auth.accounts.login(login="gh\x00ost", password="wrong-pass-1", client="10.0.1.2")


# 2. ChangePassword's wrong current passwords count against the same budget.


async def test_change_password_attempts_spend_the_login_budget(auth: Auth) -> None:
    signed_up = await auth.accounts.register(
        client=CLIENT, email="eve@example.com", password=PASSWORD
    )
    who = _who(signed_up)
    for _ in range(LIMIT - 1):
        with pytest.raises(InvalidCredentials):
            await auth.accounts.change_password(who, current="wrong-pass-1", new="new-pass-456")
    with pytest.raises(InvalidCredentials):
        await auth.accounts.login(
            login="eve@example.com", password="wrong-pass-1", client="10.0.0.1"
        )
    # Spent: neither the right current password nor a sign-in gets through now.
    with pytest.raises(RateLimited) as refused:
        await auth.accounts.change_password(who, current=PASSWORD, new="new-pass-456")
    assert 0 < int(refused.value.details["retry_after"]) <= 3600
    with pytest.raises(RateLimited):
        await auth.accounts.login(login="eve@example.com", password=PASSWORD, client="10.0.0.2")


# 3. A disabled (or deleted) account's access token manages no credentials.


async def test_a_disabled_accounts_token_manages_no_keys_or_accounts(auth: Auth) -> None:
    root = await _admin(auth, "root@example.com")
    signed_up = await auth.accounts.register(
        client=CLIENT, email="mallory@example.com", password=PASSWORD
    )
    who = _who(signed_up)
    key, _ = await auth.keys.create(who, name="before", scopes=["read"], expires_at=None)
    await auth.admin.update(root, who.subject, username="", email="", name="", disabled=True)

    with pytest.raises(AuthRequired):
        await auth.keys.create(who, name="after", scopes=["read"], expires_at=None)
    with pytest.raises(AuthRequired):
        await auth.keys.list(who, page(10, 0))
    with pytest.raises(AuthRequired):
        await auth.keys.revoke(who, key.key_id)
    with pytest.raises(AuthRequired):
        await auth.admin.get(who, who.subject)
    with pytest.raises(AuthRequired):
        await auth.admin.update(
            who, who.subject, username="mallory2", email="", name="M", disabled=None
        )
    async with auth.db.session() as s:
        row = await UserStore(s).get(who.subject)
    assert row is not None and row.username != "mallory2" and row.disabled


async def test_a_disabled_admins_token_administers_nobody(auth: Auth) -> None:
    root = await _admin(auth, "root@example.com")
    other = await _admin(auth, "other@example.com")
    victim = await auth.accounts.register(
        client=CLIENT, email="victim@example.com", password=PASSWORD
    )
    await auth.admin.update(root, other.subject, username="", email="", name="", disabled=True)

    with pytest.raises(AuthRequired):
        await auth.admin.set_roles(other, victim.user.id, ["admin"])
    with pytest.raises(AuthRequired):
        await auth.admin.set_tier(other, victim.user.id, "pro")
    with pytest.raises(AuthRequired):
        await auth.admin.update(other, root.subject, username="", email="", name="", disabled=True)
    with pytest.raises(AuthRequired):
        await auth.admin.delete(other, victim.user.id)
    with pytest.raises(AuthRequired):
        await auth.admin.list(other, page(10, 0))
    with pytest.raises(AuthRequired):
        await auth.admin.create(
            other,
            username="backdoor",
            email="backdoor@example.com",
            password=PASSWORD,
            name="",
            roles=["admin"],
        )
    # The active admin still administers.
    assert (await auth.admin.get(root, victim.user.id)).roles == ["user"]


async def test_a_deleted_accounts_token_makes_no_key(auth: Auth) -> None:
    root = await _admin(auth, "root@example.com")
    signed_up = await auth.accounts.register(
        client=CLIENT, email="gone@example.com", password=PASSWORD
    )
    await auth.admin.delete(root, signed_up.user.id)
    with pytest.raises(AuthRequired):
        await auth.keys.create(
            _who(signed_up), name="k", scopes=["read"], expires_at=now() + timedelta(days=1)
        )


# 4. One account per address, in any Unicode form; nothing invisible; ASCII digits.


async def test_an_address_in_another_unicode_form_is_the_same_account(auth: Auth) -> None:
    first = await auth.accounts.register(
        client=CLIENT, email="b\u00f6b@example.com", password=PASSWORD
    )
    assert first.user.email == "b\u00f6b@example.com"
    for twin in (
        "bo\u0308b@example.com",  # o + combining diaeresis
        "B\u00d6B@EXAMPLE.COM",
        "\uff42\u00f6\uff42@example.com",  # fullwidth b
    ):
        with pytest.raises(UserExists):
            await auth.accounts.register(client=CLIENT, email=twin, password=PASSWORD)
    signed_in = await auth.accounts.login(
        login="BO\u0308B@example.com", password=PASSWORD, client="10.0.0.1"
    )
    assert signed_in.user.id == first.user.id
    # And through the other ways of setting an address.
    other = await auth.accounts.register(
        client=CLIENT, email="other@example.com", password=PASSWORD
    )
    with pytest.raises(UserExists):
        await auth.accounts.update_me(_who(other), name="", email="bo\u0308b@example.com")
    root = await _admin(auth, "root@example.com")
    with pytest.raises(UserExists):
        await auth.admin.create(
            root, username="bob2", email="BO\u0308B@example.com", password="", name="", roles=[]
        )


@pytest.mark.parametrize(
    "email",
    [
        "ctl\u0000x@example.com",
        "bel\u0007x@example.com",
        "del\u007fx@example.com",
        "rlo\u202ex@example.com",
        "zw\u200bsp@example.com",
        "\u200bzw@example.com",
        "bom\ufeffx@example.com",
        "soft\u00adhyphen@example.com",
        "pua\ue000x@example.com",
        "x@exa\u200dmple.com",
    ],
)
async def test_invisible_characters_in_an_address_are_refused(auth: Auth, email: str) -> None:
    with pytest.raises(ValidationError) as refused:
        await auth.accounts.register(client=CLIENT, email=email, password=PASSWORD)
    assert refused.value.details == {"field": "email"}
    signed_up = await auth.accounts.register(
        client=CLIENT, email="fine@example.com", password=PASSWORD
    )
    with pytest.raises(ValidationError):
        await auth.accounts.update_me(_who(signed_up), name="", email=email)


@pytest.mark.parametrize("username", ["bo\u200bb", "\u001fbob", "bob\u202e", "b\u0000ob"])
async def test_invisible_characters_in_a_username_are_refused(auth: Auth, username: str) -> None:
    with pytest.raises(ValidationError) as refused:
        await auth.accounts.register(
            client=CLIENT, username=username, email="someone@example.com", password=PASSWORD
        )
    assert refused.value.details == {"field": "username"}


async def test_a_password_needs_an_ascii_digit(auth: Auth) -> None:
    with pytest.raises(ValidationError) as refused:
        await auth.accounts.register(
            client=CLIENT,
            email="arabic@example.com",
            password="\u0661\u0662\u0663\u0664\u0665\u0666\u0667a",
        )
    assert refused.value.details == {"field": "password"}
    await auth.accounts.register(
        client=CLIENT, email="ascii@example.com", password="\u0661\u0662\u0663a1bcd"
    )


async def _migrate_auth(db: Database, revision: str) -> None:
    folder = MIGRATIONS["auth"]
    assert folder is not None

    def upgrade(conn: Connection) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(folder))
        cfg.attributes["connection"] = conn
        cfg.attributes["version_table"] = "alembic_version_auth"
        command.upgrade(cfg, revision)

    async with db.writer.begin() as conn:
        await conn.run_sync(upgrade)


async def test_addresses_stored_before_are_made_canonical_and_still_found(
    database_url: str, tmp_path: Path
) -> None:
    db = Database(database_url)
    limits = _limits()
    try:
        await _migrate_auth(db, "auth_0004")
        start = now() - timedelta(days=1)
        stored = {
            # email as the old code stored it (lower-cased) -> as it is after auth_0005
            "bo\u0308b@example.com": "b\u00f6b@example.com",
            "stra\u00dfe@example.com": "strasse@example.com",
            "\uff41da@example.com": "\uff41da@example.com",  # "ada@..." below holds its form
            "ada@example.com": "ada@example.com",
            "\uff46ix@example.com": "fix@example.com",  # older than its twin: it takes the form
            "\ufb01x@example.com": "\ufb01x@example.com",
            "plain@example.com": "plain@example.com",
        }
        # Written as the code of auth_0004 wrote them: the columns of that revision only.
        legacy = sa.table(
            "auth_users",
            *(sa.column(name) for name in ("id", "username", "email", "name", "password_hash")),
            sa.column("roles", sa.JSON),
            sa.column("disabled", sa.Boolean),
            sa.column("created_at", sa.DateTime(timezone=True)),
            sa.column("updated_at", sa.DateTime(timezone=True)),
            sa.column("tier"),
        )
        hashed = await hash_password(PASSWORD)
        ids = {email: f"00000000-0000-0000-0000-{n:012d}" for n, email in enumerate(stored)}
        async with db.write() as s, s.begin():
            await s.execute(
                sa.insert(legacy),
                [
                    {
                        "id": ids[email],
                        "username": f"legacy{n}",
                        "email": email,
                        "name": "",
                        "password_hash": hashed,
                        "roles": ["user"],
                        "disabled": False,
                        "created_at": start + timedelta(minutes=n),
                        "updated_at": start,
                        "tier": "",
                    }
                    for n, email in enumerate(stored)
                ],
            )

        await _migrate_auth(db, "head")
        async with db.session() as s:
            for before, after in stored.items():
                row = await UserStore(s).get(ids[before])
                assert row is not None and row.email == after, (before, row and row.email)

        accounts = build_auth(db, tmp_path, limits).accounts
        # Each account signs in with the spelling it signed up with, and its variants when it
        # holds the canonical form.
        for login, owner in [
            ("bo\u0308b@example.com", "bo\u0308b@example.com"),
            ("B\u00d6B@example.com", "bo\u0308b@example.com"),
            ("Stra\u00dfe@example.com", "stra\u00dfe@example.com"),
            ("STRASSE@example.com", "stra\u00dfe@example.com"),
            ("\uff41da@example.com", "\uff41da@example.com"),
            ("ada@example.com", "ada@example.com"),
            ("\uff46ix@example.com", "\uff46ix@example.com"),
            ("\ufb01x@example.com", "\ufb01x@example.com"),
            ("plain@example.com", "plain@example.com"),
        ]:
            signed_in = await accounts.login(login=login, password=PASSWORD, client=login)
            assert signed_in.user.id == ids[owner], login
        # Uniqueness now covers the old rows too.
        with pytest.raises(UserExists):
            await accounts.register(client=CLIENT, email="b\u00f6b@example.com", password=PASSWORD)
        with pytest.raises(UserExists):
            await accounts.register(client=CLIENT, email="Fix@example.com", password=PASSWORD)
    finally:
        await limits.close()
        await db.close()


# 5. Signing out by refresh token ends that session, whoever's it is.


async def test_logout_with_another_accounts_refresh_token_ends_that_session(auth: Auth) -> None:
    alice = await auth.accounts.register(
        client=CLIENT, email="alice@example.com", password=PASSWORD
    )
    bob = await auth.accounts.register(client=CLIENT, email="bob@example.com", password=PASSWORD)
    await auth.accounts.logout(_who(alice), bob.refresh_token)
    with pytest.raises(AuthRequired):
        await auth.accounts.refresh(bob.refresh_token)
    # Alice's own session is untouched; an unknown token is no error.
    await auth.accounts.logout(_who(alice), "amr_unknown")
    assert (await auth.accounts.refresh(alice.refresh_token)).user.id == alice.user.id
