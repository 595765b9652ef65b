"""TokenVerifier keeps verified tokens, but never past their validity."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from servers.auth.keys import SigningKey
from servers.common.auth import TokenVerifier
from servers.common.errors import TokenExpired
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
