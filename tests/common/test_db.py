"""Migrations and the auth domain on each supported database (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect

from servers.auth.domain import Accounts
from servers.auth.keys import SigningKey
from servers.auth.profiles import AccountCache
from servers.common.context import Principal
from servers.common.db import Database
from servers.common.errors import InvalidCredentials, UserExists
from servers.mesh import MIGRATIONS
from tests.auth.test_races import lifted_limits

CLIENT = "203.0.113.7"  # the client address registrations count against


async def _migrated(url: str) -> Database:
    db = Database(url)
    for service, folder in MIGRATIONS.items():
        if folder is not None:
            await db.migrate(service, folder)
    return db


async def test_migrations_apply_and_are_idempotent(database_url: str) -> None:
    db = await _migrated(database_url)
    try:
        # A second start applies nothing and fails nothing.
        await (await _migrated(database_url)).close()
        async with db.engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert {"auth_users", "auth_refresh_tokens", "alembic_version_auth"} <= tables
        assert await db.ping()
    finally:
        await db.close()
        await db.close()  # close() is safe twice


async def test_register_and_login_on_each_database(database_url: str, tmp_path: Path) -> None:
    db = await _migrated(database_url)
    limits = lifted_limits()
    accounts = Accounts(
        db=db,
        key=SigningKey.load_or_create(tmp_path),
        issuer="i",
        audience="a",
        access_ttl=60,
        limits=limits,
        cache=AccountCache(),
    )
    try:
        issued = await accounts.register(
            client=CLIENT, email="Ann@Example.com", password="s3cret-pass"
        )
        assert issued.user.email == "ann@example.com"
        assert issued.user.username == "ann"
        with pytest.raises(UserExists):
            await accounts.register(
                client=CLIENT, email="ann@example.com", password="s3cret-pass", username="bee1"
            )
        again = await accounts.login(login="ANN@example.com", password="s3cret-pass", client="c")
        assert again.user.id == issued.user.id
        with pytest.raises(InvalidCredentials):
            await accounts.login(login="ann", password="wrong-pass-1", client="c")
        me = await accounts.me(Principal(subject=issued.user.id, kind="user"))
        assert me.password_hash and me.password_hash.startswith("$argon2id$")
        assert "m=19456,t=2" in me.password_hash
    finally:
        await db.close()


async def test_unreachable_database_is_not_ready() -> None:
    db = Database("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    try:
        assert await db.ping() is False
    finally:
        await db.close()
