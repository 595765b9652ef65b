"""Token cutoffs on each database: disabling or deleting an account raises its token
generation and writes a cutoff, which outlives the process (a restarted one lists it) and the
account (a deleted one's stays), and is forgotten once every token it refuses has expired."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest

from servers.auth.admin import CUTOFF_MARGIN, UserAdmin
from servers.auth.keys import SigningKey
from servers.auth.profiles import AccountCache
from servers.auth.store import CutoffStore
from servers.common.auth import TokenCutoffs, TokenVerifier
from servers.common.clock import now
from servers.common.context import Principal
from servers.common.errors import AuthRequired
from tests.auth.test_races import PASSWORD, Auth
from tests.auth.test_races import auth as auth  # noqa: F401 - the fixture, on each database

TTL = 900  # build_auth's access-token lifetime


async def _signed_up(auth: Auth, name: str) -> tuple[str, str]:
    """A new account's id and access token."""
    tokens = await auth.accounts.register(
        email=f"{name}@example.com", password=PASSWORD, client="127.0.0.1", username=name
    )
    return tokens.user.id, tokens.access_token


def _verifier(tmp_path: Path, cutoffs: TokenCutoffs) -> TokenVerifier:
    key = SigningKey.load_or_create(tmp_path)
    verifier = TokenVerifier(jwks=key.jwks, issuer="agentmesh", audience="agentmesh")
    verifier.cutoffs = cutoffs
    return verifier


async def _noted(admin: UserAdmin) -> TokenCutoffs:
    """The cutoffs as a process that has just started learns them (ListTokenCutoffs)."""
    cutoffs = TokenCutoffs()
    for user_id, generation, until in await admin.recent_cutoffs():
        cutoffs.note(user_id, generation, until.timestamp())
    return cutoffs


async def test_a_disable_and_a_delete_are_listed_to_every_process(
    auth: Auth, tmp_path: Path
) -> None:
    admin_id, _ = await _signed_up(auth, "root")
    acting = Principal(subject=admin_id, kind="user", roles=("admin", "user"))
    x_id, x_before = await _signed_up(auth, "xavier")
    y_id, y_token = await _signed_up(auth, "yvonne")
    _, bystander = await _signed_up(auth, "zoe")
    here = TokenCutoffs()  # the disabling process's own checks
    admin = UserAdmin(db=auth.db, cache=AccountCache(), access_ttl=TTL, cutoffs=here)
    await admin.update(acting, x_id, username="", email="", name="", disabled=True)
    await admin.delete(acting, y_id)
    assert here.refuses(x_id, 0) and here.refuses(y_id, 0)

    # Another process, or this one restarted: it learns them from the database.
    listed = await UserAdmin(db=auth.db, cache=AccountCache(), access_ttl=TTL).recent_cutoffs()
    assert {(u, g) for u, g, _ in listed} == {(x_id, 1), (y_id, 1)}
    for _, _, until in listed:
        left = until - now()
        assert timedelta(seconds=TTL) < left <= timedelta(seconds=TTL) + CUTOFF_MARGIN
    elsewhere = _verifier(tmp_path, await _noted(admin))
    for token in (x_before, y_token):
        with pytest.raises(AuthRequired):
            elsewhere.verify(token)
    assert elsewhere.verify(bystander).username == "zoe"

    # Enabled again and signed in anew: the new token carries the new generation.
    await admin.update(acting, x_id, username="", email="", name="", disabled=False)
    fresh = await auth.accounts.login(login="xavier", password=PASSWORD, client="127.0.0.1")
    assert elsewhere.verify(fresh.access_token).subject == x_id
    with pytest.raises(AuthRequired):
        elsewhere.verify(x_before)
    # A second disable refuses that one too.
    await admin.update(acting, x_id, username="", email="", name="", disabled=True)
    with pytest.raises(AuthRequired):
        _verifier(tmp_path, await _noted(admin)).verify(fresh.access_token)


async def test_cutoffs_go_once_their_tokens_have_expired(auth: Auth) -> None:
    admin = UserAdmin(db=auth.db, cache=AccountCache(), access_ttl=TTL)
    window = timedelta(seconds=TTL) + CUTOFF_MARGIN
    at = now()
    async with auth.db.write() as s, s.begin():
        store = CutoffStore(s)
        await store.cut("old", 1, at - window - timedelta(seconds=5), window)
        await store.cut("recent", 1, at - window + timedelta(seconds=30), window)
    assert [u for u, _, _ in await admin.recent_cutoffs()] == ["recent"]
    async with auth.db.write() as s, s.begin():
        await CutoffStore(s).cut("new", 2, at, window)  # a write forgets the expired ones
    async with auth.db.session() as s:
        kept = await CutoffStore(s).since(at - window * 10, 100)
    assert sorted(r.user_id for r in kept) == ["new", "recent"]
    assert time.time() < (await admin.recent_cutoffs())[0][2].timestamp()
