"""Accounts, sign-in and tokens. No gRPC here: errors are the house hierarchy.

Refresh tokens are opaque (`amr_` + 256 random bits), stored as SHA-256, and spent by their first
use, which returns a new one of the same family. Presenting a spent token again means two parties
hold it, so the whole family is revoked: the thief and the owner both sign in again. This also
applies to a client that sends two refreshes at once; clients must refresh one at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.ext.asyncio import AsyncSession

from servers.common.auth import TokenCutoffs
from servers.common.clock import aware, now
from servers.common.context import Principal
from servers.common.db import Database, take_turn
from servers.common.errors import (
    AuthRequired,
    InvalidCredentials,
    RateLimited,
    ValidationError,
)
from servers.common.ratelimit import SlidingWindowLimiter
from servers.common.rbac import DEFAULT_ROLES, permissions_of
from servers.common.text import invisible

from .cutoffs import AccessCutoffs
from .identifiers import account_key, canonical, login_key, trimmed
from .keys import SigningKey
from .models import UserRow
from .profiles import AccountCache
from .store import RefreshTokenStore, UserStore, security_event

USERNAME = re.compile(r"[a-z0-9._-]{3,32}")
EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s]+")
EMAIL_MAX = 254
PASSWORD_MIN, PASSWORD_MAX_BYTES = 8, 256
NAME_MAX = 200
REFRESH_PREFIX = "amr_"
REFRESH_TTL = timedelta(days=30)

# argon2id with OWASP's minimum: 19 MiB, 2 passes, 1 lane.
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# Verified against when the account does not exist, so an unknown user costs the same time as
# a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_password_policy(password: str) -> None:
    size = len(password.encode())
    if len(password) < PASSWORD_MIN or size > PASSWORD_MAX_BYTES:
        raise ValidationError(
            f"password must be {PASSWORD_MIN} to {PASSWORD_MAX_BYTES} bytes long",
            details={"field": "password"},
        )
    # ASCII letters and digits, as documented: \d would also take other scripts' digits.
    if not (re.search(r"[A-Za-z]", password) and re.search(r"[0-9]", password)):
        raise ValidationError(
            "password is too weak: use letters and digits", details={"field": "password"}
        )


def normalize_email(email: str, field: str = "email") -> str:
    """The address as stored and compared: canonical (identifiers.py), and refused with
    VALIDATION_ERROR when it is malformed or holds an invisible character."""
    email = trimmed(email)
    if len(email) > 4 * EMAIL_MAX or invisible(email):
        raise ValidationError("invalid email address", details={"field": field})
    email = canonical(email)
    if len(email) > EMAIL_MAX or invisible(email) or not EMAIL.fullmatch(email):
        raise ValidationError("invalid email address", details={"field": field})
    return email


def normalize_username(username: str) -> str:
    username = trimmed(username).lower()
    if invisible(username) or not USERNAME.fullmatch(username):
        raise ValidationError(
            "username must be 3-32 letters, digits, '.', '_' or '-'",
            details={"field": "username"},
        )
    return username


def check_name(name: str, field: str = "name") -> str:
    name = name.strip()
    if len(name) > NAME_MAX or any(ord(c) < 32 for c in name):
        raise ValidationError(
            f"name must be at most {NAME_MAX} printable characters", details={"field": field}
        )
    return name


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def _username_from_email(email: str) -> str:
    local = re.sub(r"[^a-z0-9._-]", "", email.split("@", 1)[0])[:27]
    return local if len(local) >= 3 else f"user{local}"


@dataclass(frozen=True)
class IssuedTokens:
    access_token: str
    refresh_token: str
    expires_in: int
    user: UserRow


@dataclass(frozen=True)
class LoginLimits:
    """Seed 001's authentication class: 10 attempts an hour, per client address and per account.

    ``per_account`` is keyed by the account a login names (identifiers.account_key), however it
    is spelt, or by the login itself when it names none (login_key); ChangePassword's attempts
    count against it too. ``registrations``: per client address, every registration that gets
    as far as hashing its password (taken or not), so that no client can make accounts, or
    spend the servers' CPU on password hashes, without end."""

    per_address: SlidingWindowLimiter
    per_account: SlidingWindowLimiter
    registrations: SlidingWindowLimiter

    async def close(self) -> None:
        await self.per_address.close()
        await self.per_account.close()
        await self.registrations.close()


async def _within_limit(
    limiter: SlidingWindowLimiter, key: str, what: str = "too many login attempts"
) -> None:
    verdict = await limiter.hit(key)
    if not verdict.allowed:
        raise RateLimited(
            f"{what}; try again later",
            details={"retry_after": verdict.retry_after, "limit": verdict.limit},
        )


async def require_active(session: AsyncSession, user_id: str, *, lock: bool = False) -> UserRow:
    """The caller's own account, read afresh (``lock``: as UserStore.get); AuthRequired when it
    is disabled or gone. Run by the RPCs that manage credentials or accounts: they read the
    account afresh, besides the token checks' cutoffs (servers/auth/cutoffs.py)."""
    user = await UserStore(session).get(user_id, lock=lock)
    if user is None or user.disabled:
        raise AuthRequired("account no longer active")
    return user


class Accounts:
    """Registration, sign-in, token refresh, sign-out and one's own profile."""

    def __init__(
        self,
        *,
        db: Database,
        key: SigningKey,
        issuer: str,
        audience: str,
        access_ttl: int,
        limits: LoginLimits,
        cache: AccountCache,
        cutoffs: TokenCutoffs | None = None,
    ) -> None:
        self._db = db
        self._cache = cache
        # ``cutoffs``: the token checks of this process, told of a cutoff once it commits.
        self._cutoffs = AccessCutoffs(db=db, access_ttl=access_ttl, here=cutoffs)
        self._key = key
        self._issuer = issuer
        self._audience = audience
        self._access_ttl = access_ttl
        self._limits = limits

    async def register(
        self, *, email: str, password: str, client: str, username: str = "", name: str = ""
    ) -> IssuedTokens:
        email = normalize_email(email)
        if username:
            username = normalize_username(username)
        check_password_policy(password)
        name = check_name(name, "full_name")
        await _within_limit(
            self._limits.registrations, client, "too many registrations from this address"
        )
        password_hash = await hash_password(password)
        at = now()
        async with self._db.write() as s, s.begin():
            users = UserStore(s)
            derived = not username
            username = username or _username_from_email(email)
            # Registrations of one username take turns: one whose name comes from its e-mail
            # address then sees a twin's name that committed first, and takes another.
            await take_turn(s, f"username:{username}")
            if derived and await users.exists(username=username, email=""):
                username = f"{username[:27]}-{secrets.token_hex(2)}"
            user = await users.add(
                UserRow(
                    id=str(uuid.uuid4()),
                    username=username,
                    email=email,
                    name=name,
                    password_hash=password_hash,
                    roles=list(DEFAULT_ROLES),
                    disabled=False,
                    created_at=at,
                    updated_at=at,
                    last_login=at,
                )
            )
            return await self._issue(s, user, at, family_id=str(uuid.uuid4()))

    async def login(self, *, login: str, password: str, client: str) -> IssuedTokens:
        login = login.strip()
        if len(login) > EMAIL_MAX:
            # No account has such a name; and it must not become a rate-limit key of that size.
            raise InvalidCredentials("invalid username, email or password")
        await _within_limit(self._limits.per_address, client)
        user = None
        if login:
            async with self._db.session() as s:
                user = await UserStore(s).find_login(login)
        # One budget per account, whichever spelling names it (username or address, in any
        # case or Unicode form). A login that names no account has a budget of its own: it is
        # refused as often, with the same answers, after the same work (one lookup, one hash).
        await _within_limit(
            self._limits.per_account, account_key(user.id) if user else login_key(login)
        )
        if not login or not password or len(password.encode()) > PASSWORD_MAX_BYTES:
            raise InvalidCredentials("invalid username, email or password")
        stored = user.password_hash if user and user.password_hash else _DUMMY_HASH
        ok = await asyncio.to_thread(_verify, stored, password)
        if user is None or not ok or user.disabled or not user.password_hash:
            raise InvalidCredentials("invalid username, email or password")
        at = now()
        async with self._db.write() as s, s.begin():
            # Locked and read again: a password change or a disable that committed while the
            # password was being checked wins over this sign-in.
            fresh = await UserStore(s).get(user.id, lock=True)
            if fresh is None or fresh.disabled or fresh.password_hash != user.password_hash:
                raise InvalidCredentials("invalid username, email or password")
            fresh.last_login = at
            issued = await self._issue(s, fresh, at, family_id=str(uuid.uuid4()))
        self._cache.forget_user(user.id)
        return issued

    async def refresh(self, token: str) -> IssuedTokens:
        """Spends a refresh token for a new pair; a replayed token revokes its family."""
        if not token.startswith(REFRESH_PREFIX) or len(token) > 128:
            raise AuthRequired("invalid refresh token")
        token_hash = sha256(token)
        at = now()
        replayed = False
        async with self._db.write() as s, s.begin():
            tokens = RefreshTokenStore(s)
            row = await tokens.get(token_hash)
            if row is None:
                raise AuthRequired("invalid refresh token")
            # The account first, then the token again, both locked (users before tokens, as
            # every writer of them): a password change, a disable or a sign-out that commits
            # meanwhile is seen here, and a concurrent one waits, then revokes what this issues.
            user = await UserStore(s).get(row.user_id, lock=True)
            row = await tokens.get(token_hash, lock=True)
            if row is None or row.revoked_at is not None or aware(row.expires_at) <= at:
                raise AuthRequired("invalid refresh token")
            if not await tokens.spend(token_hash, at):
                # Spent before: two parties hold this token. Commit the revocation, then refuse.
                # The session's access tokens go with it: one holder is a thief.
                await tokens.revoke_family(row.family_id, at)
                await self._cutoffs.end_session(s, row.user_id, row.family_id, at)
                security_event(s, "security.refresh_token_reuse", row.user_id, at)
                replayed = True
            elif user is not None and not user.disabled:
                # Claims are read afresh: a role change shows in this token.
                return await self._issue(s, user, at, family_id=row.family_id)
            else:
                await tokens.revoke_family(row.family_id, at)
        if replayed:
            self._cutoffs.session_committed(row.family_id, at)
            raise AuthRequired("refresh token was already used", details={"revoked": "family"})
        raise AuthRequired("account no longer active")

    async def logout(self, who: Principal, refresh_token: str = "") -> None:
        """Ends the session of ``refresh_token``, its access tokens included; without one,
        every session of the caller."""
        at = now()
        cut, ended = 0, ""
        async with self._db.write() as s, s.begin():
            tokens = RefreshTokenStore(s)
            if refresh_token:
                row = await tokens.get(sha256(refresh_token))
                # Whoever holds a refresh token may end its session, whose account it is: that
                # is no more than Refresh (public) lets the holder do, and answering "Logged
                # out" for a session left running would be a lie. Unknown tokens are a no-op.
                if row is not None:
                    # The account first (users before tokens, as every writer of them): a
                    # refresh of this session under way commits its new token before the
                    # family is revoked, and that token is revoked with the rest.
                    await UserStore(s).get(row.user_id, lock=True)
                    await tokens.revoke_family(row.family_id, at)
                    await self._cutoffs.end_session(s, row.user_id, row.family_id, at)
                    ended = row.family_id
            else:
                # The account first (users before tokens, as every writer of them). One that
                # is gone has had its tokens cut already.
                user = await UserStore(s).get(who.subject, lock=True)
                if user is not None:
                    cut = await self._cutoffs.cut(s, user, at)
                await tokens.revoke_user(who.subject, at)
        if cut:
            self._cutoffs.committed(who.subject, cut, at)
        if ended:
            self._cutoffs.session_committed(ended, at)

    async def me(self, who: Principal) -> UserRow:
        user = self._cache.profile(who.subject)
        if user is None:
            epoch = self._cache.epoch
            async with self._db.session() as s:
                user = await UserStore(s).get(who.subject)
            if user is not None:
                self._cache.put_profile(user, epoch)
        if user is None or user.disabled:
            raise AuthRequired("account no longer active")
        return user

    async def update_me(self, who: Principal, *, name: str, email: str) -> UserRow:
        async with self._db.write() as s, s.begin():
            users = UserStore(s)
            user = await users.get(who.subject)
            if user is None or user.disabled:
                raise AuthRequired("account no longer active")
            if name:
                user.name = check_name(name)
            if email:
                user.email = normalize_email(email)
            user.updated_at = now()
            await users.flush()
        self._cache.forget_user(who.subject)
        return user

    async def change_password(self, who: Principal, *, current: str, new: str) -> IssuedTokens:
        """Sets a new password and ends every session signed in with the old one, access
        tokens included; the caller goes on with the new session this returns."""
        check_password_policy(new)
        user = await self.me(who)
        # Each attempt counts against the account's login limit, before the check, so a stolen
        # access token guesses no faster here than a sign-in would.
        await _within_limit(self._limits.per_account, account_key(user.id))
        if (
            not user.password_hash
            or len(current.encode()) > PASSWORD_MAX_BYTES
            or not await asyncio.to_thread(_verify, user.password_hash, current)
        ):
            raise InvalidCredentials("current password is wrong")
        new_hash = await hash_password(new)
        at = now()
        async with self._db.write() as s, s.begin():
            fresh = await UserStore(s).get(who.subject, lock=True)
            if fresh is None or fresh.disabled:
                raise AuthRequired("account no longer active")
            if fresh.password_hash != user.password_hash:
                # Changed meanwhile (another request, another replica): `current` was checked
                # against a password that no longer is.
                raise InvalidCredentials("current password is wrong")
            fresh.password_hash = new_hash
            fresh.updated_at = at
            # Whoever signed in with the old password (or stole a token) is out, everywhere.
            await RefreshTokenStore(s).revoke_user(who.subject, at)
            cut = await self._cutoffs.cut(s, fresh, at)
            security_event(s, "security.password_changed", who.subject, at)
            issued = await self._issue(s, fresh, at, family_id=str(uuid.uuid4()))
        self._cache.forget_user(who.subject)
        self._cutoffs.committed(who.subject, cut, at)
        return issued

    async def _issue(
        self, session: AsyncSession, user: UserRow, at: datetime, *, family_id: str
    ) -> IssuedTokens:
        claims = {
            "sub": user.id,
            "username": user.username,
            "roles": list(user.roles),
            "permissions": list(permissions_of(user.roles)),
            "tier": user.tier,
            # Tokens of an older generation are refused once the account is disabled.
            "gen": user.token_generation or 0,
            # The session (its refresh-token family), the same through every refresh: its
            # tokens are refused once it signs out (servers/auth/cutoffs.py).
            "sid": family_id,
            "iat": int(at.timestamp()),
            "nbf": int(at.timestamp()),
            "exp": int(at.timestamp()) + self._access_ttl,
            "jti": str(uuid.uuid4()),
            "iss": self._issuer,
            "aud": self._audience,
            "typ": "access",
        }
        access = jwt.encode(
            claims, self._key.private_key, algorithm="ES256", headers={"kid": self._key.kid}
        )
        refresh = REFRESH_PREFIX + secrets.token_urlsafe(32)
        await RefreshTokenStore(session).add(
            token_hash=sha256(refresh),
            user_id=user.id,
            family_id=family_id,
            now=at,
            expires_at=at + REFRESH_TTL,
        )
        return IssuedTokens(access, refresh, self._access_ttl, user)
