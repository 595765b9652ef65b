"""Repositories of the auth tables."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from servers.common.errors import UserExists

from .models import RefreshTokenRow, UserRow


class UserStore:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def add(self, user: UserRow) -> UserRow:
        self._s.add(user)
        try:
            await self._s.flush()
        except IntegrityError:
            # The unique indexes decide races between two registrations of one name.
            raise UserExists("a user with that username or email exists") from None
        return user

    async def get(self, user_id: str) -> UserRow | None:
        return await self._s.get(UserRow, user_id)

    async def find_login(self, login: str) -> UserRow | None:
        """The account whose username or email is ``login`` (case-insensitive)."""
        login = login.lower()
        found = await self._s.execute(
            select(UserRow).where(or_(UserRow.username == login, UserRow.email == login))
        )
        return found.scalars().first()

    async def exists(self, *, username: str, email: str) -> bool:
        found = await self._s.execute(
            select(func.count())
            .select_from(UserRow)
            .where(or_(UserRow.username == username, UserRow.email == email))
        )
        return bool(found.scalar_one())


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
