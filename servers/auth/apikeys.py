"""API keys: `amk_` + 256 random bits, shown once, stored as SHA-256, scoped, revocable.

A key acts for its owner with the owner's current roles, narrowed to the key's scopes. Scopes are
seed 004's actions (read, write, execute) plus `agent`, the scope agent workers authenticate with.
Keys cannot sign in, refresh, change passwords or manage keys or users: those need a user session,
of an account that is not disabled (each such call reads the account afresh).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from servers.common.clock import aware, now
from servers.common.context import Principal
from servers.common.db import Database
from servers.common.errors import AuthRequired, NotFound, PermissionDenied, ValidationError
from servers.common.pagination import Page
from servers.common.rbac import AGENT_PERMISSION, allows, permissions_of

from .domain import check_name, require_active, sha256
from .models import ApiKeyRow, UserRow
from .profiles import AccountCache
from .store import ApiKeyStore, security_event

PREFIX = "amk_"
SCOPES = ("read", "write", "execute", "agent")
MAX_KEYS_PER_USER = 100
MAX_LIFETIME = timedelta(days=3650)
# last_used_at is a hint for people, not an audit log: writing it on every request would turn
# every authenticated read into a write.
TOUCH_EVERY = timedelta(seconds=60)


class ApiKeys:
    def __init__(self, *, db: Database, cache: AccountCache) -> None:
        self._db = db
        self._cache = cache

    async def create(
        self, who: Principal, *, name: str, scopes: Sequence[str], expires_at: datetime | None
    ) -> tuple[ApiKeyRow, str]:
        name = check_name(name)
        if not name or len(name) > 64:
            raise ValidationError("name must be 1-64 characters", details={"field": "name"})
        wanted = sorted(set(scopes))
        if not wanted or any(s not in SCOPES for s in wanted):
            raise ValidationError(
                f"scopes must be a non-empty subset of {', '.join(SCOPES)}",
                details={"field": "scopes"},
            )
        granted = set(permissions_of(who.roles))
        for scope in wanted:
            ok = (
                allows(who.roles, AGENT_PERMISSION)
                if scope == "agent"
                else ("*" in granted or scope in granted)
            )
            if not ok:
                raise PermissionDenied(
                    "a key cannot have a scope its owner lacks", details={"scope": scope}
                )
        at = now()
        if expires_at is not None and not (at < expires_at <= at + MAX_LIFETIME):
            raise ValidationError(
                "expires_at must be in the future and within ten years",
                details={"field": "expires_at"},
            )
        secret = PREFIX + secrets.token_urlsafe(32)
        async with self._db.write() as s, s.begin():
            keys = ApiKeyStore(s)
            # The owner's row, locked, makes its creates take turns: two at the cap cannot
            # both count one free place. A disabled owner's access token mints no key.
            await require_active(s, who.subject, lock=True)
            if await keys.count_active(who.subject) >= MAX_KEYS_PER_USER:
                raise ValidationError(
                    f"at most {MAX_KEYS_PER_USER} active keys per user",
                    details={"limit": MAX_KEYS_PER_USER},
                )
            row = await keys.add(
                ApiKeyRow(
                    key_id=str(uuid.uuid4()),
                    user_id=who.subject,
                    name=name,
                    prefix=secret[:12],
                    key_hash=sha256(secret),
                    scopes=wanted,
                    created_at=at,
                    expires_at=expires_at,
                )
            )
            security_event(
                s, "security.api_key_created", who.subject, at, key_id=row.key_id, scopes=wanted
            )
        return row, secret

    async def list(self, who: Principal, page: Page) -> tuple[Sequence[ApiKeyRow], int]:
        async with self._db.session() as s:
            await require_active(s, who.subject)
            return await ApiKeyStore(s).page(who.subject, limit=page.limit, offset=page.offset)

    async def revoke(self, who: Principal, key_id: str) -> ApiKeyRow:
        async with self._db.write() as s, s.begin():
            await require_active(s, who.subject, lock=True)
            key = await ApiKeyStore(s).owned(who.subject, key_id, lock=True)
            if key is None:
                raise NotFound("no such API key", details={"key_id": key_id[:64]})
            if key.revoked_at is None:
                key.revoked_at = now()
                security_event(
                    s, "security.api_key_revoked", who.subject, key.revoked_at, key_id=key_id
                )
        self._cache.forget_key(key.key_hash, key.user_id)
        return key

    async def verify(self, secret: str) -> tuple[UserRow, ApiKeyRow, Principal]:
        """The owner, the key and the principal behind a presented secret; AuthRequired when it
        is not valid. Runs on every API-key request, so a remembered key costs a lookup."""
        if not secret.startswith(PREFIX) or len(secret) > 128:
            raise AuthRequired("invalid API key")
        key_hash = sha256(secret)
        cached = self._cache.key(key_hash)
        if cached is not None:
            return cached
        epoch = self._cache.epoch
        async with self._db.session() as s:
            found = await ApiKeyStore(s).by_hash(key_hash)
        if found is None:
            raise AuthRequired("invalid API key")
        key, user = found
        at = now()
        if key.revoked_at is not None:
            raise AuthRequired("API key has been revoked")
        if key.expires_at is not None and aware(key.expires_at) <= at:
            raise AuthRequired("API key has expired")
        if user.disabled:
            raise AuthRequired("account no longer active")
        if key.last_used_at is None or aware(key.last_used_at) + TOUCH_EVERY <= at:
            async with self._db.write() as s, s.begin():
                await ApiKeyStore(s).touch(key.key_id, at)
            key.last_used_at = at
        who = principal_of(user, key)
        # Remembered no longer than the key is valid, nor past its next last-used write.
        until = (aware(key.last_used_at) + TOUCH_EVERY).timestamp()
        if key.expires_at is not None:
            until = min(until, aware(key.expires_at).timestamp())
        self._cache.put_key(key_hash, user, key, who, until=until, epoch=epoch)
        return user, key, who


def principal_of(user: UserRow, key: ApiKeyRow) -> Principal:
    return Principal(
        subject=user.id,
        kind="api_key",
        username=user.username,
        roles=tuple(user.roles),
        permissions=permissions_of(user.roles),
        scopes=tuple(key.scopes),
        token_id=key.key_id,
        tier=user.tier,
    )
