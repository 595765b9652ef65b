"""The rules of accounts and sign-in. No gRPC here: errors are the house hierarchy."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.ext.asyncio import AsyncSession

from servers.common.context import Principal
from servers.common.db import Database
from servers.common.errors import AuthRequired, InvalidCredentials, ValidationError
from servers.common.rbac import DEFAULT_ROLES, permissions_of

from .keys import SigningKey
from .models import UserRow
from .store import RefreshTokenStore, UserStore

USERNAME = re.compile(r"^[a-z0-9._-]{3,32}$")
EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")
PASSWORD_MIN, PASSWORD_MAX_BYTES = 8, 256
REFRESH_TTL = timedelta(days=30)

# argon2id with OWASP's minimum: 19 MiB, 2 passes, 1 lane.
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# Verified against when the account does not exist, so an unknown user costs the same time as
# a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def now() -> datetime:
    return datetime.now(UTC)


def check_password_policy(password: str) -> None:
    size = len(password.encode())
    if len(password) < PASSWORD_MIN or size > PASSWORD_MAX_BYTES:
        raise ValidationError(
            f"password must be {PASSWORD_MIN} to {PASSWORD_MAX_BYTES} bytes long",
            details={"field": "password"},
        )
    if not (re.search(r"[A-Za-z]", password) and re.search(r"\d", password)):
        raise ValidationError(
            "password is too weak: use letters and digits", details={"field": "password"}
        )


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    if len(email) > 254 or not EMAIL.match(email):
        raise ValidationError("invalid email address", details={"field": "email"})
    return email


def normalize_username(username: str) -> str:
    username = username.strip().lower()
    if not USERNAME.match(username):
        raise ValidationError(
            "username must be 3-32 letters, digits, '.', '_' or '-'",
            details={"field": "username"},
        )
    return username


def _username_from_email(email: str) -> str:
    local = re.sub(r"[^a-z0-9._-]", "", email.split("@", 1)[0])[:27]
    return local if len(local) >= 3 else f"user{local}"


@dataclass(frozen=True)
class IssuedTokens:
    access_token: str
    refresh_token: str
    expires_in: int
    user: UserRow


class Accounts:
    """Registration, sign-in and profiles."""

    def __init__(
        self, *, db: Database, key: SigningKey, issuer: str, audience: str, access_ttl: int
    ) -> None:
        self._db = db
        self._key = key
        self._issuer = issuer
        self._audience = audience
        self._access_ttl = access_ttl

    async def register(
        self, *, email: str, password: str, username: str = "", name: str = ""
    ) -> IssuedTokens:
        email = normalize_email(email)
        if username:
            username = normalize_username(username)
        check_password_policy(password)
        if len(name) > 200:
            raise ValidationError("name is too long", details={"field": "full_name"})
        password_hash = await asyncio.to_thread(_hasher.hash, password)
        at = now()
        async with self._db.session() as s, s.begin():
            users = UserStore(s)
            if not username:
                username = _username_from_email(email)
                if await users.exists(username=username, email=""):
                    username = f"{username[:27]}-{secrets.token_hex(2)}"
            user = await users.add(
                UserRow(
                    id=str(uuid.uuid4()),
                    username=username,
                    email=email,
                    name=name.strip(),
                    password_hash=password_hash,
                    roles=list(DEFAULT_ROLES),
                    disabled=False,
                    created_at=at,
                    updated_at=at,
                    last_login=at,
                )
            )
            return await self._issue(s, user, at)

    async def login(self, *, login: str, password: str) -> IssuedTokens:
        if not login or not password or len(password.encode()) > PASSWORD_MAX_BYTES:
            raise InvalidCredentials("invalid username, email or password")
        async with self._db.session() as s, s.begin():
            user = await UserStore(s).find_login(login.strip())
            stored = user.password_hash if user and user.password_hash else _DUMMY_HASH
            ok = await asyncio.to_thread(_verify, stored, password)
            if user is None or not ok or user.disabled or not user.password_hash:
                raise InvalidCredentials("invalid username, email or password")
            at = now()
            user.last_login = at
            return await self._issue(s, user, at)

    async def me(self, who: Principal) -> UserRow:
        async with self._db.session() as s:
            user = await UserStore(s).get(who.subject)
        if user is None or user.disabled:
            raise AuthRequired("account no longer active")
        return user

    async def _issue(self, session: AsyncSession, user: UserRow, at: datetime) -> IssuedTokens:
        claims = {
            "sub": user.id,
            "username": user.username,
            "roles": list(user.roles),
            "permissions": list(permissions_of(user.roles)),
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
        refresh = "amr_" + secrets.token_urlsafe(32)
        await RefreshTokenStore(session).add(
            token_hash=hashlib.sha256(refresh.encode()).hexdigest(),
            user_id=user.id,
            family_id=str(uuid.uuid4()),
            now=at,
            expires_at=at + REFRESH_TTL,
        )
        return IssuedTokens(access, refresh, self._access_ttl, user)


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False
