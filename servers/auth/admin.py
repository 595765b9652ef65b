"""User administration (seed 001's /api/users).

Admins manage everyone. Anyone else may read and edit only their own record here, and another
user's record answers 404, as if it did not exist.

Disabling or deleting an account, and changing its roles or tier, end its access tokens
everywhere, not only here (servers/auth/cutoffs.py). Every call here also reads the caller's
account afresh.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from servers.common.auth import TokenCutoffs
from servers.common.clock import now
from servers.common.context import Principal
from servers.common.db import Database
from servers.common.errors import Conflict, NotFound, PermissionDenied, ValidationError
from servers.common.pagination import Page
from servers.common.quotas import TIERS
from servers.common.rbac import DEFAULT_ROLES, ROLES

from .cutoffs import AccessCutoffs
from .domain import (
    check_name,
    check_password_policy,
    hash_password,
    normalize_email,
    normalize_username,
    require_active,
)
from .models import UserRow
from .profiles import AccountCache
from .store import RefreshTokenStore, UserStore, security_event


def is_admin(who: Principal) -> bool:
    return "admin" in who.roles


def check_roles(roles: Sequence[str]) -> list[str]:
    wanted = sorted(set(roles))
    if not wanted or any(r not in ROLES for r in wanted):
        raise ValidationError(
            f"roles must be a non-empty subset of {', '.join(ROLES)}", details={"field": "roles"}
        )
    return wanted


class UserAdmin:
    def __init__(
        self,
        *,
        db: Database,
        cache: AccountCache,
        access_ttl: int,
        cutoffs: TokenCutoffs | None = None,
    ) -> None:
        self._db = db
        self._cache = cache
        # ``cutoffs``: the token checks of this process, told of a cutoff once it commits.
        self.cutoffs = AccessCutoffs(db=db, access_ttl=access_ttl, here=cutoffs)

    async def list(self, who: Principal, page: Page) -> tuple[Sequence[UserRow], int]:
        async with self._db.session() as s:
            await require_active(s, who.subject)
            return await UserStore(s).page(limit=page.limit, offset=page.offset)

    async def create(
        self,
        who: Principal,
        *,
        username: str,
        email: str,
        password: str,
        name: str,
        roles: Sequence[str],
    ) -> UserRow:
        username = normalize_username(username)
        email = normalize_email(email)
        name = check_name(name)
        role_list = check_roles(roles) if roles else list(DEFAULT_ROLES)
        password_hash = None
        if password:
            check_password_policy(password)
            password_hash = await hash_password(password)
        at = now()
        async with self._db.write() as s, s.begin():
            await require_active(s, who.subject)
            return await UserStore(s).add(
                UserRow(
                    id=str(uuid.uuid4()),
                    username=username,
                    email=email,
                    name=name,
                    password_hash=password_hash,
                    roles=role_list,
                    disabled=False,
                    created_at=at,
                    updated_at=at,
                    last_login=None,
                )
            )

    async def get(self, who: Principal, user_id: str) -> UserRow:
        async with self._db.session() as s:
            caller = await require_active(s, who.subject)
            if not (is_admin(who) or who.subject == user_id):
                raise NotFound("no such user", details={"user_id": user_id[:64]})
            user = caller if who.subject == user_id else await UserStore(s).get(user_id)
        if user is None:
            raise NotFound("no such user", details={"user_id": user_id[:64]})
        return user

    async def update(
        self,
        who: Principal,
        user_id: str,
        *,
        username: str,
        email: str,
        name: str,
        disabled: bool | None,
    ) -> UserRow:
        at = now()
        async with self._db.write() as s, s.begin():
            # Locked when it is the account changed, so a disable committing meanwhile wins.
            await require_active(s, who.subject, lock=who.subject == user_id)
            if not (is_admin(who) or who.subject == user_id):
                raise NotFound("no such user", details={"user_id": user_id[:64]})
            users = UserStore(s)
            user = await users.get(user_id, lock=True)
            if user is None:
                raise NotFound("no such user", details={"user_id": user_id[:64]})
            # Sending back the flag unchanged (a record read, edited, written) is no change.
            if disabled is not None and disabled != user.disabled:
                if not is_admin(who):
                    raise PermissionDenied("only admins enable or disable accounts")
                if who.subject == user_id:
                    raise Conflict("admins cannot disable their own account")
            if username:
                user.username = normalize_username(username)
            if email:
                user.email = normalize_email(email)
            if name:
                user.name = check_name(name)
            cut = 0
            if disabled is not None and disabled != user.disabled:
                user.disabled = disabled
                if disabled:
                    await RefreshTokenStore(s).revoke_user(user_id, at)
                    # Its access tokens end too, in every service.
                    cut = await self.cutoffs.cut(s, user, at)
                event = "security.account_disabled" if disabled else "security.account_enabled"
                security_event(s, event, user_id, at, by=who.subject)
            user.updated_at = at
            await users.flush()
        self._cache.forget_user(user_id)
        if cut:
            self.cutoffs.committed(user_id, cut, at)
        return user

    async def delete(self, who: Principal, user_id: str) -> None:
        if who.subject == user_id:
            raise Conflict("admins cannot delete their own account")
        at = now()
        async with self._db.write() as s, s.begin():
            await require_active(s, who.subject)
            users = UserStore(s)
            user = await users.get(user_id, lock=True)
            if user is None:
                raise NotFound("no such user", details={"user_id": user_id[:64]})
            # Every token the account was ever issued is refused.
            generation = await self.cutoffs.cut(s, user, at)
            await users.delete(user)
        self._cache.forget_user(user_id)
        self.cutoffs.committed(user_id, generation, at)

    async def set_roles(self, who: Principal, user_id: str, roles: Sequence[str]) -> UserRow:
        wanted = check_roles(roles)
        if who.subject == user_id and "admin" not in wanted:
            raise Conflict("admins cannot take their own admin role away")
        return await self._set(who, user_id, "roles", wanted)

    async def set_tier(self, who: Principal, user_id: str, tier: str) -> UserRow:
        if tier and tier not in TIERS:
            raise ValidationError(
                f"tier must be one of {', '.join(TIERS)}, or empty for the default",
                details={"field": "tier"},
            )
        return await self._set(who, user_id, "tier", tier)

    async def _set(self, who: Principal, user_id: str, field: str, value: object) -> UserRow:
        """Sets one of an account's access attributes (roles, tier), with its security event
        (security.roles_changed, security.tier_changed). The account's API keys follow at
        once. Its access tokens, which carry the old value, end: its sessions go on at their
        next refresh, whose token carries the new one. Setting the value it has is no change."""
        at = now()
        async with self._db.write() as s, s.begin():
            await require_active(s, who.subject)
            user = await UserStore(s).get(user_id, lock=True)
            if user is None:
                raise NotFound("no such user", details={"user_id": user_id[:64]})
            if getattr(user, field) == value:
                return user
            setattr(user, field, value)
            user.updated_at = at
            cut = await self.cutoffs.cut(s, user, at)
            security_event(
                s, f"security.{field}_changed", user_id, at, by=who.subject, **{field: value}
            )
        self._cache.forget_user(user_id)
        self.cutoffs.committed(user_id, cut, at)
        return user


async def grant_role(db: Database, login: str, role: str) -> UserRow:
    """Adds a role to an account (the operator's way to make the first admin), with its
    security.roles_changed event, as a change through UsersService has: granting admin is the
    change most worth an audit trail. ``by`` is "operator": no account made it."""
    (role,) = check_roles([role])
    async with db.write() as s, s.begin():
        user = await UserStore(s).find_login(login, lock=True)
        if user is None:
            raise NotFound("no such user", details={"login": login[:64]})
        if role in user.roles:
            return user
        at = now()
        user.roles = sorted({*user.roles, role})
        user.updated_at = at
        security_event(s, "security.roles_changed", user.id, at, by="operator", roles=user.roles)
        return user
