"""Token cutoffs on each database: disabling or deleting an account (and changing its password,
signing out everywhere, changing its roles or tier) raises its token generation and writes a
cutoff, which outlives the process (a restarted one lists it) and the account (a deleted one's
stays), and is forgotten once every token it refuses has expired."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from pathlib import Path

import pytest

from servers.auth.admin import UserAdmin
from servers.auth.cutoffs import CUTOFF_MARGIN
from servers.auth.domain import Accounts, IssuedTokens, LoginLimits
from servers.auth.keys import SigningKey
from servers.auth.profiles import AccountCache
from servers.auth.store import CutoffStore, SessionCutoffStore
from servers.common.auth import SESSION_ENDED, TokenCutoffs, TokenVerifier
from servers.common.clock import now
from servers.common.context import Principal
from servers.common.errors import AuthRequired
from tests.auth.test_races import PASSWORD, Auth, lifted_limits
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


def _refused(verifier: TokenVerifier, token: str) -> bool:
    try:
        verifier.verify(token)
    except AuthRequired:
        return True
    return False


async def _noted(admin: UserAdmin) -> TokenCutoffs:
    """The cutoffs as a process that has just started learns them (ListTokenCutoffs)."""
    cutoffs = TokenCutoffs()
    for user_id, generation, until in await admin.cutoffs.recent():
        cutoffs.note(user_id, generation, until.timestamp())
    for session_id, until in await admin.cutoffs.recent_sessions():
        cutoffs.end_session(session_id, until.timestamp())
    return cutoffs


def _accounts(auth: Auth, tmp_path: Path, here: TokenCutoffs, limits: LoginLimits) -> Accounts:
    """Accounts whose changes reach ``here`` at once, as the mesh wires its process's checks."""
    return Accounts(
        db=auth.db,
        key=SigningKey.load_or_create(tmp_path),
        issuer="agentmesh",
        audience="agentmesh",
        access_ttl=TTL,
        limits=limits,
        cache=AccountCache(),
        cutoffs=here,
    )


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
    listed = await UserAdmin(db=auth.db, cache=AccountCache(), access_ttl=TTL).cutoffs.recent()
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
    assert [u for u, _, _ in await admin.cutoffs.recent()] == ["recent"]
    async with auth.db.write() as s, s.begin():
        await CutoffStore(s).cut("new", 2, at, window)  # a write forgets the expired ones
    async with auth.db.session() as s:
        kept = await CutoffStore(s).since(at - window * 10, 100)
    assert sorted(r.user_id for r in kept) == ["new", "recent"]
    assert time.time() < (await admin.cutoffs.recent())[0][2].timestamp()


async def test_every_change_that_ends_sessions_cuts_the_access_tokens(
    auth: Auth, tmp_path: Path
) -> None:
    """A password change, a sign-out of every session and a change of roles or tier refuse the
    account's access tokens in every process, as a disable does; setting what the account
    already has refuses nothing."""
    admin_id, _ = await _signed_up(auth, "root")
    acting = Principal(subject=admin_id, kind="user", roles=("admin", "user"))
    admin = UserAdmin(db=auth.db, cache=AccountCache(), access_ttl=TTL)
    changes = {
        "password": lambda who: auth.accounts.change_password(
            who, current=PASSWORD, new="new-pass-456"
        ),
        "logout": lambda who: auth.accounts.logout(who),
        "roles": lambda who: admin.set_roles(acting, who.subject, ["viewer"]),
        "tier": lambda who: admin.set_tier(acting, who.subject, "free"),
    }
    before: dict[str, str] = {}
    for name, change in changes.items():
        user_id, token = await _signed_up(auth, name)
        before[name] = token
        await change(Principal(subject=user_id, kind="user", roles=("user",)))
    # Setting the roles or the tier an account has is no change.
    same_id, same_token = await _signed_up(auth, "same")
    await admin.set_roles(acting, same_id, ["user"])
    await admin.set_tier(acting, same_id, "")

    elsewhere = _verifier(tmp_path, await _noted(admin))
    assert [name for name, token in before.items() if not _refused(elsewhere, token)] == []
    assert elsewhere.verify(same_token).subject == same_id


async def test_a_password_change_hands_the_caller_a_new_session(auth: Auth, tmp_path: Path) -> None:
    here = TokenCutoffs()  # the checks of the process that serves the change
    limits = lifted_limits()
    accounts = _accounts(auth, tmp_path, here, limits)
    user_id, old = await _signed_up(auth, "carol")
    who = Principal(subject=user_id, kind="user", roles=("user",))
    issued = await accounts.change_password(who, current=PASSWORD, new="new-pass-456")
    verifier = _verifier(tmp_path, here)  # told at once, before any poll
    with pytest.raises(AuthRequired):
        verifier.verify(old)
    assert verifier.verify(issued.access_token).subject == user_id
    renewed = await accounts.refresh(issued.refresh_token)
    assert verifier.verify(renewed.access_token).subject == user_id
    await limits.close()


async def _two_sessions(
    accounts: Accounts, name: str
) -> tuple[IssuedTokens, IssuedTokens, IssuedTokens]:
    """A new account's first session, as signed up and once refreshed, and a second session."""
    signed_up = await accounts.register(
        email=f"{name}@example.com", password=PASSWORD, client="127.0.0.1", username=name
    )
    renewed = await accounts.refresh(signed_up.refresh_token)
    other = await accounts.login(login=name, password=PASSWORD, client="127.0.0.1")
    return signed_up, renewed, other


async def _only_the_session_ended(
    tmp_path: Path, here: TokenCutoffs, admin: UserAdmin, ended: list[str], other: str
) -> None:
    """The ended session's access tokens are refused, at once in the process that ended it
    (``here``) and in one that learns from the database; the other session's token holds."""
    for verifier in (_verifier(tmp_path, here), _verifier(tmp_path, await _noted(admin))):
        for token in ended:
            with pytest.raises(AuthRequired, match=re.escape(SESSION_ENDED)):
                verifier.verify(token)
        verifier.verify(other)


async def test_a_sign_out_ends_its_session_and_no_other(auth: Auth, tmp_path: Path) -> None:
    """A logout with a refresh token refuses the access tokens of that session (its sign-in's
    and its refreshes') at once in the process that served it and, from the database, in every
    other; the account's other session goes on."""
    here, limits = TokenCutoffs(), lifted_limits()
    accounts = _accounts(auth, tmp_path, here, limits)
    signed_up, renewed, other = await _two_sessions(accounts, "dora")
    user_id = signed_up.user.id
    await accounts.logout(
        Principal(subject=user_id, kind="user", roles=("user",)), renewed.refresh_token
    )

    admin = UserAdmin(db=auth.db, cache=AccountCache(), access_ttl=TTL)
    await _only_the_session_ended(
        tmp_path, here, admin, [signed_up.access_token, renewed.access_token], other.access_token
    )
    assert await admin.cutoffs.recent() == []  # the account itself was not cut
    ((_, until),) = await admin.cutoffs.recent_sessions()
    assert timedelta(seconds=TTL) < until - now() <= timedelta(seconds=TTL) + CUTOFF_MARGIN
    with pytest.raises(AuthRequired):
        await accounts.refresh(renewed.refresh_token)
    assert (await accounts.refresh(other.refresh_token)).user.id == user_id
    await limits.close()


async def test_a_replayed_refresh_token_ends_its_sessions_access_tokens(
    auth: Auth, tmp_path: Path
) -> None:
    """Two parties hold the session: the thief's access tokens go with its refresh tokens."""
    here, limits = TokenCutoffs(), lifted_limits()
    accounts = _accounts(auth, tmp_path, here, limits)
    signed_up, renewed, bystander = await _two_sessions(accounts, "eve")
    with pytest.raises(AuthRequired, match="already used"):
        await accounts.refresh(signed_up.refresh_token)
    admin = UserAdmin(db=auth.db, cache=AccountCache(), access_ttl=TTL)
    await _only_the_session_ended(
        tmp_path,
        here,
        admin,
        [signed_up.access_token, renewed.access_token],
        bystander.access_token,
    )
    await limits.close()


async def test_ended_sessions_go_once_their_tokens_have_expired(auth: Auth) -> None:
    admin = UserAdmin(db=auth.db, cache=AccountCache(), access_ttl=TTL)
    window = timedelta(seconds=TTL) + CUTOFF_MARGIN
    at = now()
    async with auth.db.write() as s, s.begin():
        store = SessionCutoffStore(s)
        await store.end("old", "u1", at - window - timedelta(seconds=5), window)
        await store.end("recent", "u1", at - window + timedelta(seconds=30), window)
    assert [sid for sid, _ in await admin.cutoffs.recent_sessions()] == ["recent"]
    async with auth.db.write() as s, s.begin():
        store = SessionCutoffStore(s)
        await store.end("new", "u2", at, window)  # a write forgets the expired ones
        await store.end("new", "u2", at + timedelta(seconds=9), window)  # ended already: kept
    async with auth.db.session() as s:
        kept = await SessionCutoffStore(s).since(at - window * 10, 100)
    assert sorted(r.session_id for r in kept) == ["new", "recent"]
    newest = await admin.cutoffs.recent_sessions()
    assert newest[0][0] == "new" and newest[0][1] - at == window
