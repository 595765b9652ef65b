"""Ending an account's access tokens everywhere, not only where the account is read.

Access tokens carry the account's token generation (the `gen` claim). A change that must end
them (a disable or a deletion, a password change, a sign-out of every session, a change of
roles or tier) raises the generation and writes a cutoff, in the transaction that makes the
change. The token checks of the process that made it learn the cutoff once it commits; those of
every other process from AuthInternalService.ListTokenCutoffs, which they poll
(servers/common/auth.py).

A sign-out of one session ends that session alone: access tokens also carry their session (the
`sid` claim: the refresh-token family they came from, the same from the sign-in through every
refresh), and the session's end is listed the same way. A refresh token that is replayed ends its
session so too: one of the two holders is a thief, and the access tokens the session handed out
are refused along with its refresh tokens.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from servers.common.auth import TokenCutoffs
from servers.common.clock import aware, now
from servers.common.db import Database

from .models import UserRow
from .store import CutoffStore, SessionCutoffStore

# Cutoffs are kept, and listed, for an access token's lifetime and this much more: a process
# whose clock runs behind the auth service's still sees a token expire before its cutoff goes.
CUTOFF_MARGIN = timedelta(seconds=60)
CUTOFFS_LISTED = 10_000  # at most, newest first (AuthInternalService.ListTokenCutoffs)


class AccessCutoffs:
    def __init__(self, *, db: Database, access_ttl: int, here: TokenCutoffs | None) -> None:
        self._db = db
        self._window = timedelta(seconds=access_ttl) + CUTOFF_MARGIN
        self._here = here  # this process's token checks (None: it checks no tokens itself)

    async def cut(self, s: AsyncSession, user: UserRow, at: datetime) -> int:
        """In the caller's transaction, with the account locked: refuses every access token
        the account holds now. Returns the new generation, for ``committed``; the tokens
        issued from here on carry it."""
        user.token_generation = (user.token_generation or 0) + 1
        await CutoffStore(s).cut(user.id, user.token_generation, at, self._window)
        return user.token_generation

    def committed(self, user_id: str, generation: int, at: datetime) -> None:
        """After the cut's transaction has committed: this process refuses the tokens at once,
        without waiting for its next poll."""
        if self._here is not None:
            self._here.note(user_id, generation, (at + self._window).timestamp())

    async def end_session(
        self, s: AsyncSession, user_id: str, session_id: str, at: datetime
    ) -> None:
        """In the caller's transaction, with the session's refresh tokens revoked: refuses
        every access token of the session."""
        await SessionCutoffStore(s).end(session_id, user_id, at, self._window)

    def session_committed(self, session_id: str, at: datetime) -> None:
        """After end_session's transaction has committed: this process refuses the session's
        tokens at once."""
        if self._here is not None:
            self._here.end_session(session_id, (at + self._window).timestamp())

    async def recent_sessions(self) -> list[tuple[str, datetime]]:
        """The sessions ended whose tokens may not have expired yet: (session id, when the
        last of them expires), newest first."""
        at = now()
        async with self._db.session() as s:
            rows = await SessionCutoffStore(s).since(at - self._window, CUTOFFS_LISTED)
        return [(r.session_id, aware(r.ended_at) + self._window) for r in rows]

    async def recent(self) -> list[tuple[str, int, datetime]]:
        """The cutoffs whose refused tokens may not have expired yet: (user id, lowest
        generation accepted, when the last refused token expires), newest first."""
        at = now()
        async with self._db.session() as s:
            rows = await CutoffStore(s).since(at - self._window, CUTOFFS_LISTED)
        return [(r.user_id, r.min_generation, aware(r.changed_at) + self._window) for r in rows]
