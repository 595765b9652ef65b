"""Verifying who calls: access tokens (JWT) against the auth service's public keys, mesh-internal
service credentials, and the policy check of policy.py.

Every server runs this, not only Envoy: a client talking gRPC straight to a server meets the
same rules, and no server trusts a header it cannot verify (the identity Envoy extracted is not
read; the token itself is checked again).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping
from typing import Any

import jwt
from jwt.algorithms import ECAlgorithm

from . import policy
from .context import Principal
from .errors import AuthRequired, PermissionDenied, TokenExpired
from .rbac import allows

ALGORITHMS = ["ES256"]
INTERNAL_HEADER = "x-agentmesh-internal"


class TokenVerifier:
    """Checks access tokens: signature by a known `kid`, ES256 only, issuer, audience, expiry.

    ``jwks`` returns the current JSON Web Key Set; it is asked again for a kid it does not know
    (key rotation), at most once per call.
    """

    def __init__(self, *, jwks: Callable[[], Mapping[str, Any]], issuer: str, audience: str):
        self._jwks = jwks
        self._issuer = issuer
        self._audience = audience
        self._keys: dict[str, Any] = {}

    def _load(self) -> None:
        keys = {}
        for jwk in self._jwks().get("keys", []):
            if jwk.get("kty") == "EC" and jwk.get("kid"):
                keys[jwk["kid"]] = ECAlgorithm.from_jwk(json.dumps(jwk))
        self._keys = keys

    def _key(self, kid: str) -> Any:
        if kid not in self._keys:
            self._load()
        key = self._keys.get(kid)
        if key is None:
            raise AuthRequired("token signed by an unknown key", details={"kid": kid[:64]})
        return key

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthRequired("malformed token") from None
        if header.get("alg") not in ALGORITHMS:
            raise AuthRequired("token algorithm not accepted")
        key = self._key(str(header.get("kid", "")))
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=ALGORITHMS,
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "iat", "sub", "jti", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired("access token has expired") from None
        except jwt.InvalidTokenError:
            raise AuthRequired("invalid access token") from None
        if claims.get("typ") != "access":
            raise AuthRequired("not an access token")
        return Principal(
            subject=str(claims["sub"]),
            kind="user",
            username=str(claims.get("username", "")),
            roles=tuple(claims.get("roles") or ()),
            permissions=tuple(claims.get("permissions") or ()),
            token_id=str(claims["jti"]),
        )


def bearer_token(metadata: Mapping[str, str]) -> str | None:
    """The credential of `authorization: Bearer <token>`; never read from anywhere else."""
    raw = metadata.get("authorization", "")
    scheme, _, token = raw.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authenticator:
    """Applies the policy table to a call's metadata and returns its principal."""

    def __init__(self, *, verifier: TokenVerifier, internal_token: str) -> None:
        self._verifier = verifier
        self._internal_token = internal_token

    async def authorize(self, method: str, metadata: Mapping[str, str]) -> Principal | None:
        rule = policy.rule_for(method)
        if rule.internal:
            presented = metadata.get(INTERNAL_HEADER, "")
            if not presented or not hmac.compare_digest(presented, self._internal_token):
                raise PermissionDenied("internal RPC", details={"rpc": method})
            return Principal(subject="mesh", kind="service")
        token = bearer_token(metadata)
        if rule.public:
            # A public RPC ignores credentials; it never fails because of a bad one.
            return None
        if token is None:
            raise AuthRequired("authentication required")
        who = self._verifier.verify(token)
        if rule.agent and "agent" not in who.scopes:
            raise PermissionDenied("only agents may call this", details={"rpc": method})
        if rule.permission is not None and not allows(who.roles, rule.permission):
            raise PermissionDenied(
                "insufficient permissions",
                details={
                    "required": f"{rule.permission.action}:{rule.permission.resource}",
                },
            )
        return who
