"""What the auth service remembers about accounts for a moment: profiles (for GetMe and
ValidateToken) and verified API keys (for every request that carries one).

The auth service is the only writer of accounts and keys, and each of its writes forgets what it
changed once the write has committed: a revoked key, or a disabled, deleted or re-roled owner, is
refused on the very next request served by this process. With Redis, the forget goes to the other
auth replicas too (invalidations.py), and they forget the account as soon as it arrives; a forget
lost on the way, or a write the mesh is not told of, shows within ``ttl`` seconds. A key's expiry
is checked on every use. Refresh tokens and passwords are never served from here.

A read races a write: a lookup that began before a revocation committed could put the old, valid
row back after the revocation forgot it. ``epoch`` counts forgets; a reader takes it before going
to the database and hands it back with the row, which is not kept if a forget came in between.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from servers.common.context import Principal

from .models import ApiKeyRow, UserRow


class AccountCache:
    def __init__(self, *, ttl: float = 2.0, size: int = 10_000) -> None:
        self._ttl = ttl
        self._size = size
        self._profiles: OrderedDict[str, tuple[UserRow, float]] = OrderedDict()
        # key hash -> (owner, key, principal, usable until: time.time(); None: no expiry)
        self._keys: OrderedDict[str, tuple[UserRow, ApiKeyRow, Principal, float]] = OrderedDict()
        self._keys_of: dict[str, set[str]] = {}
        self.epoch = 0
        # Told the id of every account this process forgot after its own write (the other
        # replicas forget it too); None in one process.
        self.announce: Callable[[str], None] | None = None

    def profile(self, user_id: str) -> UserRow | None:
        entry = self._profiles.get(user_id)
        if entry is None or time.monotonic() >= entry[1]:
            self._profiles.pop(user_id, None)
            return None
        return entry[0]

    def put_profile(self, user: UserRow, epoch: int) -> None:
        if epoch != self.epoch:
            return
        self._profiles[user.id] = (user, time.monotonic() + self._ttl)
        self._profiles.move_to_end(user.id)
        if len(self._profiles) > self._size:
            self._profiles.popitem(last=False)

    def key(self, key_hash: str) -> tuple[UserRow, ApiKeyRow, Principal] | None:
        """A verified key that is still usable: neither past the cache's time nor its own expiry
        nor its next last-used write."""
        entry = self._keys.get(key_hash)
        if entry is None or time.time() >= entry[3]:
            self._drop_key(key_hash)
            return None
        return entry[0], entry[1], entry[2]

    def put_key(
        self,
        key_hash: str,
        user: UserRow,
        key: ApiKeyRow,
        who: Principal,
        *,
        until: float,
        epoch: int,
    ) -> None:
        """``until`` (time.time()) caps the entry, e.g. at the key's expiry."""
        if epoch != self.epoch:
            return
        self._keys[key_hash] = (user, key, who, min(until, time.time() + self._ttl))
        self._keys.move_to_end(key_hash)
        self._keys_of.setdefault(user.id, set()).add(key_hash)
        if len(self._keys) > self._size:
            oldest, _ = next(iter(self._keys.items()))
            self._drop_key(oldest)

    def forget_key(self, key_hash: str, user_id: str) -> None:
        """After the revocation of a key of the account ``user_id`` has committed. The other
        replicas are told to forget the whole account, so no key hash leaves the process."""
        self.epoch += 1
        self._drop_key(key_hash)
        if self.announce is not None:
            self.announce(user_id)

    def forget_user(self, user_id: str, *, announce: bool = True) -> None:
        """After any write to the account (profile, roles, disabled, deletion) has committed;
        ``announce``: False for a forget another replica announced."""
        if announce and self.announce is not None:
            self.announce(user_id)
        self.epoch += 1
        self._profiles.pop(user_id, None)
        for key_hash in self._keys_of.pop(user_id, set()):
            self._keys.pop(key_hash, None)

    def _drop_key(self, key_hash: str) -> None:
        entry = self._keys.pop(key_hash, None)
        if entry is not None:
            hashes = self._keys_of.get(entry[0].id)
            if hashes is not None:
                hashes.discard(key_hash)
                if not hashes:
                    del self._keys_of[entry[0].id]
