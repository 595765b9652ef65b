"""Repositories of the auth tables."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from servers.common.db import InsertOrNothing
from servers.common.errors import UserExists
from servers.common.outbox import write_event

from .identifiers import canonical
from .models import (
    ApiKeyRow,
    OutboxRow,
    RefreshTokenRow,
    SessionCutoffRow,
    TokenCutoffRow,
    UserRow,
)


class UserStore:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def add(self, user: UserRow) -> UserRow:
        self._s.add(user)
        await self.flush()
        return user

    async def flush(self) -> None:
        try:
            await self._s.flush()
        except IntegrityError:
            # The unique indexes decide races between two writers of one name.
            raise UserExists("a user with that username or email exists") from None

    async def get(self, user_id: str, *, lock: bool = False) -> UserRow | None:
        """The account; ``lock``: locked for this transaction (PostgreSQL; SQLite's writers
        take turns anyway), read afresh even if the session holds it already.

        A transaction that decides from an account's state, or changes its sessions or keys,
        locks the account row first: users before tokens and keys, always in that order. A
        refresh and a password change then take turns, and the change revokes the tokens the
        refresh issued."""
        if not lock:
            return await self._s.get(UserRow, user_id)
        return await self._s.get(UserRow, user_id, with_for_update=True, populate_existing=True)

    async def find_login(self, login: str, *, lock: bool = False) -> UserRow | None:
        """The account whose username or email is ``login``, in any case or Unicode form
        (identifiers.canonical); ``lock``: as for ``get``.

        An address stored before addresses were canonical, and left so by migration auth_0005
        because its canonical form is another account's, is found as typed (lower-cased, as it
        was stored), and wins over the canonical match: each of the two accounts stays
        reachable by the spelling it signed up with."""
        if "\x00" in login and (await self._s.connection()).dialect.name == "postgresql":
            return None  # PostgreSQL's text holds no NUL: no account has one, and it cannot ask
        key, legacy = canonical(login.strip()), login.strip().lower()
        query = select(UserRow).where(
            or_(UserRow.username == key, UserRow.email == key, UserRow.email == legacy)
        )
        found = (await self._s.execute(query.with_for_update() if lock else query)).scalars()
        return min(found, key=lambda user: user.email != legacy, default=None)

    async def exists(self, *, username: str, email: str) -> bool:
        found = await self._s.execute(
            select(func.count())
            .select_from(UserRow)
            .where(or_(UserRow.username == username, UserRow.email == email))
        )
        return bool(found.scalar_one())

    async def page(self, *, limit: int, offset: int) -> tuple[Sequence[UserRow], int]:
        total = (await self._s.execute(select(func.count()).select_from(UserRow))).scalar_one()
        rows = await self._s.execute(
            select(UserRow).order_by(UserRow.created_at, UserRow.id).limit(limit).offset(offset)
        )
        return rows.scalars().all(), int(total)

    async def delete(self, user: UserRow) -> None:
        await self._s.delete(user)
        await self._s.flush()


class RefreshTokenStore:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def add(
        self,
        *,
        token_hash: str,
        user_id: str,
        family_id: str,
        now: datetime,
        expires_at: datetime,
    ) -> None:
        self._s.add(
            RefreshTokenRow(
                token_hash=token_hash,
                user_id=user_id,
                family_id=family_id,
                created_at=now,
                expires_at=expires_at,
            )
        )
        await self._s.flush()

    async def get(self, token_hash: str, *, lock: bool = False) -> RefreshTokenRow | None:
        """The token; ``lock``: locked, and read afresh (see UserStore.get)."""
        if not lock:
            return await self._s.get(RefreshTokenRow, token_hash)
        return await self._s.get(
            RefreshTokenRow, token_hash, with_for_update=True, populate_existing=True
        )

    async def spend(self, token_hash: str, now: datetime) -> bool:
        """Marks the token used, if nobody did before; the database decides between racers."""
        result = await self._s.execute(
            update(RefreshTokenRow)
            .where(
                RefreshTokenRow.token_hash == token_hash,
                RefreshTokenRow.used_at.is_(None),
                RefreshTokenRow.revoked_at.is_(None),
            )
            .values(used_at=now)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def revoke_family(self, family_id: str, now: datetime) -> None:
        await self._s.execute(
            update(RefreshTokenRow)
            .where(RefreshTokenRow.family_id == family_id, RefreshTokenRow.revoked_at.is_(None))
            .values(revoked_at=now)
            .execution_options(synchronize_session=False)
        )

    async def revoke_user(self, user_id: str, now: datetime) -> None:
        await self._s.execute(
            update(RefreshTokenRow)
            .where(RefreshTokenRow.user_id == user_id, RefreshTokenRow.revoked_at.is_(None))
            .values(revoked_at=now)
            .execution_options(synchronize_session=False)
        )


class CutoffStore:
    """The accounts whose older access tokens are refused (TokenCutoffRow)."""

    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def cut(self, user_id: str, min_generation: int, at: datetime, keep: timedelta) -> None:
        """Refuses the account's tokens below ``min_generation`` from ``at``, and forgets the
        cutoffs older than ``keep`` (one access-token lifetime): their tokens have expired."""
        await self._s.execute(delete(TokenCutoffRow).where(TokenCutoffRow.changed_at < at - keep))
        row = await self._s.get(TokenCutoffRow, user_id)
        if row is None:
            self._s.add(
                TokenCutoffRow(user_id=user_id, min_generation=min_generation, changed_at=at)
            )
        else:
            row.min_generation = max(row.min_generation, min_generation)
            row.changed_at = at
        await self._s.flush()

    async def since(self, since: datetime, limit: int) -> Sequence[TokenCutoffRow]:
        """The cutoffs made since ``since``, newest first, ``limit`` at most."""
        rows = await self._s.execute(
            select(TokenCutoffRow)
            .where(TokenCutoffRow.changed_at >= since)
            .order_by(TokenCutoffRow.changed_at.desc(), TokenCutoffRow.user_id)
            .limit(limit)
        )
        return rows.scalars().all()


_session_cutoffs = cast(Table, SessionCutoffRow.__table__)
_END_SESSION = InsertOrNothing(
    _session_cutoffs, conflict=["session_id"], returning=_session_cutoffs.c.session_id
)


class SessionCutoffStore:
    """The sessions whose access tokens are refused (SessionCutoffRow)."""

    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def end(self, session_id: str, user_id: str, at: datetime, keep: timedelta) -> None:
        """Refuses the session's access tokens from ``at``, and forgets the ended sessions
        older than ``keep`` (one access-token lifetime). A session ended before stays as it
        was: it has issued no token since."""
        await self._s.execute(delete(SessionCutoffRow).where(SessionCutoffRow.ended_at < at - keep))
        await _END_SESSION(self._s, {"session_id": session_id, "user_id": user_id, "ended_at": at})

    async def since(self, since: datetime, limit: int) -> Sequence[SessionCutoffRow]:
        """The sessions ended since ``since``, newest first, ``limit`` at most."""
        rows = await self._s.execute(
            select(SessionCutoffRow)
            .where(SessionCutoffRow.ended_at >= since)
            .order_by(SessionCutoffRow.ended_at.desc(), SessionCutoffRow.session_id)
            .limit(limit)
        )
        return rows.scalars().all()


class ApiKeyStore:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def add(self, key: ApiKeyRow) -> ApiKeyRow:
        self._s.add(key)
        await self._s.flush()
        return key

    async def by_hash(self, key_hash: str) -> tuple[ApiKeyRow, UserRow] | None:
        """The key and its owner, in one round trip (this runs on every API-key request)."""
        found = await self._s.execute(
            select(ApiKeyRow, UserRow)
            .join(UserRow, UserRow.id == ApiKeyRow.user_id)
            .where(ApiKeyRow.key_hash == key_hash)
        )
        row = found.first()
        return (row[0], row[1]) if row is not None else None

    async def owned(self, user_id: str, key_id: str, *, lock: bool = False) -> ApiKeyRow | None:
        """The key if ``user_id`` owns it; ``lock``: locked for this transaction."""
        key = await self._s.get(ApiKeyRow, key_id, with_for_update=True if lock else None)
        return key if key is not None and key.user_id == user_id else None

    async def count_active(self, user_id: str) -> int:
        found = await self._s.execute(
            select(func.count())
            .select_from(ApiKeyRow)
            .where(ApiKeyRow.user_id == user_id, ApiKeyRow.revoked_at.is_(None))
        )
        return int(found.scalar_one())

    async def page(
        self, user_id: str, *, limit: int, offset: int
    ) -> tuple[Sequence[ApiKeyRow], int]:
        where = ApiKeyRow.user_id == user_id
        total = (
            await self._s.execute(select(func.count()).select_from(ApiKeyRow).where(where))
        ).scalar_one()
        rows = await self._s.execute(
            select(ApiKeyRow)
            .where(where)
            .order_by(ApiKeyRow.created_at, ApiKeyRow.key_id)
            .limit(limit)
            .offset(offset)
        )
        return rows.scalars().all(), int(total)

    async def touch(self, key_id: str, now: datetime) -> None:
        await self._s.execute(
            update(ApiKeyRow)
            .where(ApiKeyRow.key_id == key_id)
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )


def security_event(
    session: AsyncSession, event_type: str, user_id: str, at: datetime, **data: Any
) -> None:
    """Writes a security event about the user in the session's transaction."""
    write_event(
        session,
        OutboxRow,
        event_type=event_type,
        subject_id=user_id,
        owner_id=user_id,
        data={"user_id": user_id, **data},
        at=at,
    )
