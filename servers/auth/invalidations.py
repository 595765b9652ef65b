"""Forgets that reach every auth replica (DESIGN.md, Operations).

Each auth process remembers verified API keys and profiles for a moment (profiles.py), and
forgets an account once its own write to it has committed. A write served by another replica
used to show here only when the remembered entry ran out (``AGENTMESH_AUTH_CACHE_SECONDS``), so a
key revoked through one replica kept working through the others for up to that long.

With Redis, a replica publishes the ids of the accounts it forgot on the bus topic "auth", and
every auth process follows that topic and forgets them too. Ids are coalesced: one entry per turn
of the loop. The entry names accounts only, never keys: a revoked key's account is forgotten
whole, and is read again at its next request. ``agentmesh grant-role`` publishes the same way.

Like every signal (servers/common/broadcast.py) this is best effort: an entry lost to a Redis
outage leaves the remembered entries to run out, as before. With the in-process bus there is no
other replica, and nothing is published.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping

from servers.common.broadcast import Broadcast
from servers.common.bus import Bus
from servers.common.follower import Follower

from .profiles import AccountCache

log = logging.getLogger("agentmesh.auth")

TOPIC = "auth"
# Forgets matter only while an entry is remembered (seconds), so only a short tail is kept.
RETENTION_MS = 60_000
MAX_LEN = 10_000
IDS_PER_ENTRY = 200
# Ids waiting to be published, at most; past it (a long outage, a flood of writes) the rest are
# left to expire (and a warning says so).
PENDING_MAX = 10_000
USER_ID_MAX = 64


def broadcast(bus: Bus, follower: Follower | None) -> Broadcast:
    return Broadcast(
        bus,
        follower,
        topic=TOPIC,
        what="auth invalidations",
        log=log,
        retention_ms=RETENTION_MS,
        max_len=MAX_LEN,
    )


async def announce(channel: Broadcast, user_ids: list[str]) -> bool:
    """Publishes that these accounts changed; whether every entry went out."""
    ok = True
    for start in range(0, len(user_ids), IDS_PER_ENTRY):
        chunk = user_ids[start : start + IDS_PER_ENTRY]
        ok = await channel.publish({"kind": "forget", "users": json.dumps(chunk)}) and ok
    return ok


class Invalidations:
    """This replica's side: the cache announces its forgets here, which are published; the
    others' forgets are applied to the cache."""

    def __init__(self, cache: AccountCache, *, bus: Bus, follower: Follower) -> None:
        self._cache = cache
        self._channel = broadcast(bus, follower)
        self._pending: dict[str, None] = {}  # ids in the order forgotten, each once
        self._flushing: asyncio.Task[None] | None = None
        self._dropped = False  # whether ids were left to expire since the last warning

    def start(self) -> None:
        self._cache.announce = self._forgotten
        self._channel.start(self._act)

    async def close(self) -> None:
        self._cache.announce = None
        self._channel.stop()
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)

    def _forgotten(self, user_id: str) -> None:
        if user_id not in self._pending and len(self._pending) >= PENDING_MAX:
            if not self._dropped:
                log.warning("too many auth invalidations waiting; some are left to expire")
            self._dropped = True
            return
        self._pending[user_id] = None
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # the rest of this turn's forgets join the entry
        while self._pending:
            ids, self._pending = list(self._pending), {}
            self._dropped = False
            await announce(self._channel, ids)

    def _act(self, fields: Mapping[str, str]) -> None:
        if fields.get("kind") != "forget":
            return  # a newer replica's kind, in a rolling upgrade
        ids = json.loads(fields["users"])
        if not isinstance(ids, list) or not all(
            isinstance(i, str) and 0 < len(i) <= USER_ID_MAX for i in ids
        ):
            raise TypeError("users must be a list of account ids")
        for user_id in ids:
            self._cache.forget_user(user_id, announce=False)
