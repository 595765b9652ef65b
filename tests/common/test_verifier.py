"""TokenVerifier keeps verified tokens, but never past their validity."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import pytest

from servers.auth.keys import SigningKey
from servers.common.auth import (
    SESSION_ENDED,
    SESSION_ID_MAX,
    KnownCutoffs,
    TokenCutoffs,
    TokenVerifier,
    follow_cutoffs,
)
from servers.common.errors import AuthRequired, TokenExpired
from tests.attacks import AUDIENCE, ISSUER, sign


def test_a_remembered_token_still_expires(tmp_path: Path) -> None:
    key = SigningKey.load_or_create(tmp_path)
    verifier = TokenVerifier(jwks=key.jwks, issuer=ISSUER, audience=AUDIENCE)
    now = int(time.time())
    token = sign(key.private_key, key.kid, iat=now, exp=now + 1)
    assert verifier.verify(token).subject == "u1"
    assert verifier.verify(token).subject == "u1"  # from memory
    time.sleep(max(0.0, now + 1 - time.time()) + 0.05)
    with pytest.raises(TokenExpired):
        verifier.verify(token)
    with pytest.raises(TokenExpired):
        verifier.verify(token)  # and no longer remembered


def test_memory_is_bounded(tmp_path: Path) -> None:
    key = SigningKey.load_or_create(tmp_path)
    verifier = TokenVerifier(jwks=key.jwks, issuer=ISSUER, audience=AUDIENCE, cache_size=3)
    for i in range(10):
        verifier.verify(sign(key.private_key, key.kid, jti=f"j{i}"))
    assert len(verifier._verified) == 3


def test_a_cutoff_refuses_the_older_tokens_of_its_account_only(tmp_path: Path) -> None:
    key = SigningKey.load_or_create(tmp_path)
    verifier = TokenVerifier(jwks=key.jwks, issuer=ISSUER, audience=AUDIENCE)
    legacy = sign(key.private_key, key.kid, jti="a")  # issued before tokens carried `gen`
    older = sign(key.private_key, key.kid, jti="b", gen=1)
    other = sign(key.private_key, key.kid, jti="c", sub="u2")
    for token in (legacy, older, other):
        verifier.verify(token)  # all valid, and remembered
    verifier.cutoffs.note("u1", 2, time.time() + 60)
    for token in (legacy, older):
        with pytest.raises(AuthRequired, match="token ended by a change to the account"):
            verifier.verify(token)
    assert verifier.verify(other).subject == "u2"
    # A token issued after the change carries the new generation.
    assert verifier.verify(sign(key.private_key, key.kid, jti="d", gen=2)).subject == "u1"
    # A lower cutoff arriving late (an older poll) lowers nothing.
    verifier.cutoffs.note("u1", 1, time.time() + 60)
    with pytest.raises(AuthRequired):
        verifier.verify(older)


def test_an_ended_session_refuses_its_tokens_only(tmp_path: Path) -> None:
    key = SigningKey.load_or_create(tmp_path)
    verifier = TokenVerifier(jwks=key.jwks, issuer=ISSUER, audience=AUDIENCE)
    first = sign(key.private_key, key.kid, jti="a", sid="s1")
    refreshed = sign(key.private_key, key.kid, jti="b", sid="s1")  # the same session, later
    other = sign(key.private_key, key.kid, jti="c", sid="s2")  # the same account, elsewhere
    legacy = sign(key.private_key, key.kid, jti="d")  # issued before tokens carried `sid`
    for token in (first, refreshed, other, legacy):
        verifier.verify(token)  # all valid, and remembered
    verifier.cutoffs.end_session("s1", time.time() + 60)
    for token in (first, refreshed):
        with pytest.raises(AuthRequired, match=re.escape(SESSION_ENDED)):
            verifier.verify(token)
    assert verifier.verify(other).subject == "u1"
    assert verifier.verify(legacy).subject == "u1"


@pytest.mark.parametrize("session", [7, None, ["s1"], "s" * (SESSION_ID_MAX + 1)])
def test_a_session_that_is_not_a_short_string_is_refused(tmp_path: Path, session: object) -> None:
    key = SigningKey.load_or_create(tmp_path)
    verifier = TokenVerifier(jwks=key.jwks, issuer=ISSUER, audience=AUDIENCE)
    with pytest.raises(AuthRequired, match="invalid access token"):
        verifier.verify(sign(key.private_key, key.kid, sid=session))


@pytest.mark.parametrize("generation", ["2", 1.5, True, None, [2]])
def test_a_generation_that_is_not_an_integer_is_refused(tmp_path: Path, generation: object) -> None:
    key = SigningKey.load_or_create(tmp_path)
    verifier = TokenVerifier(jwks=key.jwks, issuer=ISSUER, audience=AUDIENCE)
    with pytest.raises(AuthRequired, match="invalid access token"):
        verifier.verify(sign(key.private_key, key.kid, gen=generation))


def test_cutoffs_are_forgotten_once_their_tokens_have_expired() -> None:
    cutoffs = TokenCutoffs()
    cutoffs.note("u1", 1, 100.0)
    cutoffs.note("u2", 1, 200.0)
    cutoffs.end_session("s1", 100.0)
    cutoffs.end_session("s2", 200.0)
    cutoffs.forget_before(150.0)
    assert not cutoffs.refuses("u1", 0)
    assert cutoffs.refuses("u2", 0)
    assert not cutoffs.session_ended("s1")
    assert cutoffs.session_ended("s2")
    assert len(cutoffs) == 2


async def test_the_follower_notes_what_the_auth_service_lists_and_rides_out_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cutoffs = TokenCutoffs()
    answers: list[KnownCutoffs | Exception] = [
        ConnectionError("auth service down"),
        ConnectionError("still down"),
        KnownCutoffs(
            accounts=[("u1", 3, time.time() + 60), ("gone", 1, time.time() - 1)],
            sessions=[("s1", time.time() + 60), ("s-gone", time.time() - 1)],
        ),
    ]
    fetched = asyncio.Event()

    async def fetch() -> KnownCutoffs:
        answer = answers.pop(0) if answers else KnownCutoffs()
        if not answers:
            fetched.set()
        if isinstance(answer, Exception):
            raise answer
        return answer

    with caplog.at_level(logging.INFO, logger="agentmesh.auth"):
        job = asyncio.ensure_future(follow_cutoffs(cutoffs, fetch, every=0.01))
        try:
            await asyncio.wait_for(fetched.wait(), 5)
            await asyncio.sleep(0.05)
        finally:
            job.cancel()
    assert cutoffs.refuses("u1", 2) and not cutoffs.refuses("u1", 3)
    assert not cutoffs.refuses("gone", 0)  # its tokens have expired: not kept
    assert cutoffs.session_ended("s1") and not cutoffs.session_ended("s2")
    assert not cutoffs.session_ended("s-gone")
    assert len(cutoffs) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per outage, not once per attempt
    assert any("again" in r.getMessage() for r in caplog.records)
