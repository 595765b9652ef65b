"""Verifying who calls: access tokens (JWT) against the auth service's public keys, mesh-internal
service credentials, and the policy check of policy.py.

Every server runs this, not only Envoy: a client talking gRPC straight to a server meets the
same rules, and no server trusts a header it cannot verify (the identity Envoy extracted is not
read; the token itself is checked again).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import jwt
from jwt.algorithms import ECAlgorithm

from . import policy
from .context import Principal, current_call
from .errors import AuthRequired, PermissionDenied, TokenExpired, Unavailable
from .peers import open_channel
from .rbac import AGENT_PERMISSION, allows, permissions_of

log = logging.getLogger("agentmesh.auth")

ALGORITHMS = ["ES256"]
INTERNAL_HEADER = "x-agentmesh-internal"
CALL_TIMEOUT = 2.0
# The refusal of a token a change to its account ended (a disable, a new password, new roles...).
TOKEN_ENDED = "token ended by a change to the account; refresh it or sign in again"
# The refusal of a token whose session ended (signed out, or its refresh token replayed).
SESSION_ENDED = "token ended with its session (signed out); sign in again"
SESSION_ID_MAX = 64  # the longest `sid` claim taken; the mesh's are 36 characters


class TokenCutoffs:
    """The access tokens refused in this process. By user id, the lowest token generation (the
    `gen` claim, 0 when absent) still accepted and until when (epoch s) that matters; and by
    session id (the `sid` claim), the sessions that ended and until when their tokens may be
    presented. Filled from the auth service (AuthInternalService.ListTokenCutoffs, polled by
    ``follow_cutoffs``) and, in the process that made the change that ended them
    (servers/auth/cutoffs.py), at once."""

    def __init__(self) -> None:
        self._by_user: dict[str, tuple[int, float]] = {}
        self._sessions: dict[str, float] = {}

    def note(self, user_id: str, min_generation: int, until: float) -> None:
        known, known_until = self._by_user.get(user_id, (0, 0.0))
        self._by_user[user_id] = (max(known, min_generation), max(known_until, until))

    def end_session(self, session_id: str, until: float) -> None:
        self._sessions[session_id] = max(self._sessions.get(session_id, 0.0), until)

    def refuses(self, user_id: str, generation: int) -> bool:
        entry = self._by_user.get(user_id)
        return entry is not None and generation < entry[0]

    def session_ended(self, session_id: str) -> bool:
        return bool(session_id) and session_id in self._sessions

    def forget_before(self, moment: float) -> None:
        """Forgets the entries whose refused tokens have all expired by ``moment``."""
        for user_id in [u for u, (_, until) in self._by_user.items() if until < moment]:
            del self._by_user[user_id]
        for session_id in [s for s, until in self._sessions.items() if until < moment]:
            del self._sessions[session_id]

    def __len__(self) -> int:
        return len(self._by_user) + len(self._sessions)


@dataclass(frozen=True)
class KnownCutoffs:
    """What one ListTokenCutoffs answers: (user id, lowest generation accepted, until when in
    epoch s) by account, and (session id, until when) by ended session."""

    accounts: list[tuple[str, int, float]] = field(default_factory=list)
    sessions: list[tuple[str, float]] = field(default_factory=list)


# The auth service's cutoffs.
CutoffFetch = Callable[[], Awaitable[KnownCutoffs]]
CUTOFF_RETRY_SECONDS = 1.0  # the pause after a failed fetch, when the interval is longer


async def follow_cutoffs(cutoffs: TokenCutoffs, fetch: CutoffFetch, every: float) -> None:
    """Runs for the life of the process: notes the auth service's cutoffs every ``every``
    seconds, so that a token ended by a change made through any process (a disable, a new
    password, new roles, a sign-out...) is refused here within that time. While the auth
    service does not answer, what is known stays (a warning says so once), and nothing else
    changes: tokens are still checked on their own."""
    failing = False
    while True:
        try:
            entries = await fetch()
        except Exception as exc:  # any failure of the call; the next one may succeed
            if not failing:
                log.warning("token cutoffs cannot be read from the auth service: %s", exc)
            failing = True
            await asyncio.sleep(min(every, CUTOFF_RETRY_SECONDS))
            continue
        if failing:
            log.info("token cutoffs are read from the auth service again")
        failing = False
        for user_id, generation, until in entries.accounts:
            cutoffs.note(user_id, generation, until)
        for session_id, until in entries.sessions:
            cutoffs.end_session(session_id, until)
        cutoffs.forget_before(time.time())
        await asyncio.sleep(every)


@dataclass(frozen=True, slots=True)
class _Verified:
    """A token whose signature and claims were checked: what is checked again at each use."""

    who: Principal
    not_before: float
    expires: float
    generation: int  # the `gen` claim
    session: str  # the `sid` claim, "" when absent


class TokenVerifier:
    """Checks access tokens: signature by a known `kid`, ES256 only, issuer, audience, expiry.

    ``jwks`` returns the current JSON Web Key Set; it is asked again for a kid it does not know
    (key rotation), at most once per call.
    """

    def __init__(
        self,
        *,
        jwks: Callable[[], Mapping[str, Any]],
        issuer: str,
        audience: str,
        cache_size: int = 10_000,
    ):
        self._jwks = jwks
        self._issuer = issuer
        self._audience = audience
        self._keys: dict[str, Any] = {}
        # A signed token cannot change, so its signature is checked once: the principal is kept
        # by token with its validity window, which is checked again on every use.
        self._verified: OrderedDict[str, _Verified] = OrderedDict()
        self._cache_size = cache_size
        self.cutoffs = TokenCutoffs()

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
        cached = self._verified.get(token)
        if cached is not None:
            now = time.time()
            if now >= cached.expires:
                del self._verified[token]
                raise TokenExpired("access token has expired")
            if now >= cached.not_before:
                self._verified.move_to_end(token)
                return self._current(cached)
        verified = self._verify(token)
        self._verified[token] = verified
        if len(self._verified) > self._cache_size:
            self._verified.popitem(last=False)
        return self._current(verified)

    def _current(self, token: _Verified) -> Principal:
        """The token's principal, unless a change to its account or the end of its session
        ended it after it was issued (servers/auth/cutoffs.py)."""
        if self.cutoffs.refuses(token.who.subject, token.generation):
            raise AuthRequired(TOKEN_ENDED)
        if self.cutoffs.session_ended(token.session):
            raise AuthRequired(SESSION_ENDED)
        return token.who

    def _verify(self, token: str) -> _Verified:
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
        who = Principal(
            subject=str(claims["sub"]),
            kind="user",
            username=str(claims.get("username", "")),
            roles=tuple(claims.get("roles") or ()),
            permissions=tuple(claims.get("permissions") or ()),
            token_id=str(claims["jti"]),
            tier=str(claims.get("tier") or ""),
        )
        generation = claims.get("gen", 0)
        # Exactly an int: isinstance would let true and false through as 1 and 0.
        if type(generation) is not int:  # noqa: E721
            raise AuthRequired("invalid access token")
        # Tokens issued before sessions were carried have none: only their account's changes
        # end them.
        session = claims.get("sid", "")
        if not isinstance(session, str) or len(session) > SESSION_ID_MAX:
            raise AuthRequired("invalid access token")
        # PyJWT allows no leeway by default; keep the cache exactly as strict.
        return _Verified(
            who, float(claims.get("nbf", 0)), float(claims["exp"]), generation, session
        )


def bearer_token(metadata: Mapping[str, str]) -> str | None:
    """The credential of `authorization: Bearer <token>`; never read from a query string."""
    raw = metadata.get("authorization", "")
    scheme, _, token = raw.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


API_KEY_PREFIX = "amk_"

# Resolves an API key's secret to its principal; raises AuthRequired when it is not valid.
ApiKeyResolver = Callable[[str], Awaitable[Principal]]


class ApiKeyClient:
    """Asks the auth service (AuthInternalService.VerifyApiKey) who an API key belongs to.

    Not cached: a revoked key must stop working on the next request.
    """

    def __init__(self, *, address: Callable[[], str], internal_token: str) -> None:
        self._address = address
        self._internal_token = internal_token
        self._channel: grpc.aio.Channel | None = None

    async def __call__(self, secret: str) -> Principal:
        from agentmesh.v1 import auth_pb2, auth_pb2_grpc

        if self._channel is None:
            self._channel = open_channel(self._address())
        stub = auth_pb2_grpc.AuthInternalServiceStub(self._channel)
        try:
            reply = await stub.VerifyApiKey(
                auth_pb2.VerifyApiKeyRequest(key=secret),
                metadata=((INTERNAL_HEADER, self._internal_token),),
                timeout=CALL_TIMEOUT,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise AuthRequired(exc.details() or "invalid API key") from None
            raise Unavailable("cannot verify the API key now") from None
        return Principal(
            subject=reply.user.id,
            kind="api_key",
            username=reply.user.username,
            roles=tuple(reply.user.roles),
            permissions=permissions_of(tuple(reply.user.roles)),
            scopes=tuple(reply.scopes),
            token_id=reply.key_id,
            tier=reply.user.tier,
        )

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class Authenticator:
    """Applies the policy table to a call's metadata and returns its principal.

    Credentials, in order: `Authorization: Bearer amk_...` (an API key), `Authorization: Bearer
    <JWT>` (an access token), `X-API-Key: amk_...`.
    """

    def __init__(
        self, *, verifier: TokenVerifier, internal_token: str, api_keys: ApiKeyResolver
    ) -> None:
        self._verifier = verifier
        self._internal_token = internal_token
        self._api_keys = api_keys

    async def authenticate(self, metadata: Mapping[str, str]) -> Principal:
        token = bearer_token(metadata)
        if token is not None:
            if token.startswith(API_KEY_PREFIX):
                return await self._api_keys(token)
            return self._verifier.verify(token)
        api_key = metadata.get("x-api-key", "").strip()
        if api_key:
            return await self._api_keys(api_key)
        raise AuthRequired("authentication required")

    async def authorize(self, method: str, metadata: Mapping[str, str]) -> Principal | None:
        rule = policy.rule_for(method)
        if rule.internal:
            presented = metadata.get(INTERNAL_HEADER, "")
            if not presented or not hmac.compare_digest(presented, self._internal_token):
                raise PermissionDenied("internal RPC", details={"rpc": method})
            return Principal(subject="mesh", kind="service")
        if rule.public:
            # A public RPC ignores credentials; it never fails because of a bad one.
            return None
        who = await self.authenticate(metadata)
        if rule.user_only and who.kind != "user":
            raise PermissionDenied(
                "this needs a signed-in user, not an API key", details={"rpc": method}
            )
        if rule.agent and not (
            who.kind == "api_key"
            and "agent" in who.scopes
            # The owner's current roles, not those it had when the key was made.
            and allows(who.roles, AGENT_PERMISSION)
        ):
            raise PermissionDenied("only agents may call this", details={"rpc": method})
        if rule.permission is not None:
            need = rule.permission
            granted = allows(who.roles, need)
            if granted and who.kind == "api_key":
                # A key acts with its owner's roles, narrowed to its scopes.
                granted = need.action in who.scopes
            if not granted:
                raise PermissionDenied(
                    "insufficient permissions",
                    details={"required": f"{need.action}:{need.resource}"},
                )
        return who


# --- Streams outlive the call that authorized them ---

CredentialCheck = Callable[[], Awaitable[object]]


def current_call_check(authenticator: Authenticator | None) -> CredentialCheck | None:
    """The authorization the current call passed when it opened, to run again later with the
    same method and metadata; None outside a call or without an authenticator (a servicer
    built alone in a test)."""
    call = current_call()
    if authenticator is None or call is None or not call.method:
        return None
    method, metadata = call.method, dict(call.metadata)

    async def check() -> object:
        return await authenticator.authorize(method, metadata)

    return check


async def guard_stream(
    check: CredentialCheck | None,
    every: float,
    refused: Callable[[AuthRequired | PermissionDenied], None],
) -> None:
    """Runs for the life of a stream: every ``every`` seconds, checks again the credential the
    stream was opened with. A key revoked, a token expired, a role taken away: ``refused``
    gets the error the call's authorization would raise now, and the guard ends. An auth
    service that does not answer ends nothing; the next interval checks again."""
    if check is None:
        return
    while True:
        await asyncio.sleep(every)
        try:
            await check()
        except (AuthRequired, PermissionDenied) as exc:
            refused(exc)
            return
        except Unavailable:
            continue
