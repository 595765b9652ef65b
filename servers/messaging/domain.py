"""The rules of inter-agent messages: what may be sent, idempotency, limits, acknowledgement,
request/response, and the expiry of old messages. Who the sender and the recipient are is
decided before (servers/messaging/resolver.py); this module takes them as given.

The database is the truth: a message is stored before anyone is told of it, streams read it
from there, and it stays until its TTL ends (acknowledged or not).
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from servers.common.clock import aware, now
from servers.common.db import Database, take_turn
from servers.common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    NotFound,
    RateLimited,
    ValidationError,
)
from servers.common.pagination import PAGE_MAX_BYTES, Page
from servers.common.protos import NESTING_MAX, json_size, too_deep
from servers.common.ratelimit import SlidingWindowLimiter

from .hub import InboxHub
from .models import MessageRow
from .store import MessageStore

log = logging.getLogger("agentmesh.messaging")

TYPES = ("request", "response", "event")
# Ids travel in URL paths (/messages/{message_id}/ack): letters, digits and . _ : - only.
ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")
MAX_AGENT_ID = 64
PAYLOAD_MAX_BYTES = 256 * 1024
DEFAULT_TTL, MAX_TTL = 3600, 86_400
DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS = 30_000, 300_000
# Per sending agent: at most RATE_LIMIT messages (SendMessage and SendRequest) per RATE_WINDOW
# seconds (the mesh takes the limit from AGENTMESH_MESSAGE_RATE_LIMIT).
RATE_LIMIT, RATE_WINDOW = 50, 1.0
# Unacknowledged, unexpired messages one recipient may hold; past it sends to it are refused
# (429 INBOX_FULL); the mesh takes it from AGENTMESH_INBOX_MAX_UNACKED.
MAX_UNACKED = 10_000
SWEEP_SECONDS, SWEEP_BATCH = 60.0, 1000


@dataclass(frozen=True)
class AgentRef:
    """An agent as messaging knows it: its id and the user who owns it."""

    agent_id: str
    owner_id: str


@dataclass(frozen=True, kw_only=True)
class NewMessage:
    to_agent: str
    type: str
    payload: dict[str, Any]
    message_id: str = ""  # "": the server chooses one
    correlation_id: str = ""
    ttl_seconds: int = 0  # 0: the default


def check(new: NewMessage) -> NewMessage:
    """Validates a message to send; returns it with its defaults filled in."""
    if not new.to_agent:
        raise ValidationError("to_agent is required", details={"field": "to_agent"})
    if len(new.to_agent) > MAX_AGENT_ID:
        raise ValidationError(
            f"to_agent is longer than {MAX_AGENT_ID} characters", details={"field": "to_agent"}
        )
    if new.type not in TYPES:
        raise ValidationError("type must be request, response or event", details={"field": "type"})
    for field in ("message_id", "correlation_id"):
        value = getattr(new, field)
        if value and not ID_PATTERN.match(value):
            raise ValidationError(
                f"{field} must be 1-128 letters, digits, '.', '_', ':' or '-'",
                details={"field": field, "max": 128},
            )
    if new.type == "response" and not new.correlation_id:
        raise ValidationError(
            "a response carries its request's correlation_id",
            details={"field": "correlation_id"},
        )
    ttl = new.ttl_seconds or DEFAULT_TTL
    if not 1 <= ttl <= MAX_TTL:
        raise ValidationError(
            f"ttl_seconds must be between 1 and {MAX_TTL}",
            details={"field": "ttl_seconds", "max": MAX_TTL},
        )
    size = json_size(new.payload)
    if size > PAYLOAD_MAX_BYTES:
        raise ValidationError(
            f"payload is larger than {PAYLOAD_MAX_BYTES} bytes",
            details={"field": "payload", "max": PAYLOAD_MAX_BYTES, "size": size},
        )
    if too_deep(new.payload):
        raise ValidationError(
            f"payload nests objects and arrays deeper than {NESTING_MAX} levels",
            details={"field": "payload", "max_depth": NESTING_MAX},
        )
    return replace(new, ttl_seconds=ttl)


def check_timeout(timeout_ms: int) -> float:
    """The wait of a SendRequest in seconds; 0 means the default."""
    timeout_ms = timeout_ms or DEFAULT_TIMEOUT_MS
    if not 1 <= timeout_ms <= MAX_TIMEOUT_MS:
        raise ValidationError(
            f"timeout_ms must be between 1 and {MAX_TIMEOUT_MS}",
            details={"field": "timeout_ms", "max": MAX_TIMEOUT_MS},
        )
    return timeout_ms / 1000


def expired(row: MessageRow, at: datetime) -> bool:
    return aware(row.expires_at) <= at


def notification(row: MessageRow) -> dict[str, str]:
    """What the bus carries about a stored message: enough to wake, never the content."""
    return {
        "to": row.to_agent,
        "from": row.from_agent,
        "id": row.message_id,
        "type": row.type,
        "correlation_id": row.correlation_id,
    }


def copy(row: MessageRow, **changes: Any) -> MessageRow:
    """A detached copy of a message, with ``changes``. A stored row is handed as is to this
    process's streams and waiters (hub.py), which only read it; a change makes a copy."""
    fields = {c.key: getattr(row, c.key) for c in MessageRow.__table__.columns}
    return MessageRow(**(fields | changes))


def _not_found(message_id: str) -> NotFound:
    return NotFound("no such message", details={"message_id": message_id[:128]})


class Messages:
    """Sending, acknowledging and listing messages; inbox streams are in stream.py."""

    def __init__(
        self,
        *,
        db: Database,
        hub: InboxHub,
        limiter: SlidingWindowLimiter,
        max_unacked: int = MAX_UNACKED,
        poll_seconds: float = 15.0,
    ) -> None:
        self.db = db
        self.hub = hub
        self._limiter = limiter
        self._max_unacked = max_unacked
        # How often a waiting SendRequest looks at the database without being woken.
        self.poll_seconds = poll_seconds

    async def send(
        self,
        sender: AgentRef,
        recipient: AgentRef,
        new: NewMessage,
        *,
        awaited_until: datetime | None = None,
    ) -> tuple[MessageRow, bool]:
        """Stores and announces a message. Returns it and whether it is new (False: a repeat
        of the sender's message_id, which sends nothing)."""
        new = check(new)
        if new.to_agent != recipient.agent_id:
            raise ValidationError("to_agent names another agent", details={"field": "to_agent"})
        verdict = await self._limiter.hit(sender.agent_id)
        if not verdict.allowed:
            raise RateLimited(
                "too many messages from this agent",
                details={"retry_after": verdict.retry_after, "limit": verdict.limit},
            )
        async with self.db.write() as s, s.begin():
            # The time is taken once the transaction holds its connection (on SQLite, the
            # write lock), so that a row commits soon after its created_at: inbox streams
            # rely on that (stream.py, LOOKBACK).
            await s.connection()
            # Senders to the same inbox take turns from here: each one's count must see the
            # messages of those before it, or concurrent senders could all pass the cap.
            await take_turn(s, f"inbox:{recipient.agent_id}")
            at = now()
            store = MessageStore(s)
            if new.message_id:
                first = await store.get(new.message_id)
                if first is not None and expired(first, at):
                    # Gone for everyone else (404 to ack or list) until the sweep deletes
                    # it: its id is free again, and a resend is a new message, not a repeat
                    # answered with the expired one while nothing is delivered.
                    await store.delete([first.seq])
                elif first is not None:
                    return await self._repeat(store, first, sender, awaited_until), False
            held = await store.unacked_count(recipient.agent_id, at, cap=self._max_unacked)
            if held >= self._max_unacked:
                raise RateLimited(
                    "the recipient's inbox is full; it must acknowledge messages first",
                    reason="INBOX_FULL",
                    details={"to_agent": recipient.agent_id, "max_unacked": self._max_unacked},
                )
            row = MessageRow(
                message_id=new.message_id or f"msg-{uuid.uuid4().hex}",
                from_agent=sender.agent_id,
                from_owner=sender.owner_id,
                to_agent=recipient.agent_id,
                to_owner=recipient.owner_id,
                type=new.type,
                payload=new.payload,
                correlation_id=new.correlation_id,
                ttl_seconds=new.ttl_seconds,
                created_at=at,
                expires_at=at + timedelta(seconds=new.ttl_seconds),
                # A response that a SendRequest here waits for is delivered by the hub, at
                # once: it is acknowledged as it is stored.
                acked_at=at if self.hub.awaits(recipient.agent_id, new, sender.agent_id) else None,
                awaited_until=awaited_until,
            )
            if not await store.add(row):
                # A concurrent send with the same message_id committed first.
                first = await store.get(row.message_id)
                if first is None:  # pragma: no cover - it was there a moment ago
                    raise AlreadyExists("message_id is taken", details={"field": "message_id"})
                return await self._repeat(store, first, sender, awaited_until), False
            if row.type == "response":
                # Answering a request acknowledges it: the responder has handled it.
                await store.ack_answered(row)
        taken = await self.hub.notify(notification(row), row)
        if row.acked_at is not None and not taken:
            # Its waiter gave up while it was stored (its deadline, or the caller left): the
            # response belongs in the requester's inbox after all.
            row = await self._unacknowledged(row)
        return row, True

    async def _unacknowledged(self, response: MessageRow) -> MessageRow:
        async with self.db.write() as s, s.begin():
            await MessageStore(s).unack(response.message_id)
        await self.hub.notify(notification(response))
        return copy(response, acked_at=None)

    async def _repeat(
        self,
        store: MessageStore,
        first: MessageRow,
        sender: AgentRef,
        awaited_until: datetime | None,
    ) -> MessageRow:
        if first.from_agent != sender.agent_id:
            # Another agent's message: say nothing about it beyond the clash.
            raise AlreadyExists(
                "message_id is taken by another sender", details={"field": "message_id"}
            )
        if awaited_until is not None:
            await store.await_response(first.message_id, awaited_until)
            first.awaited_until = awaited_until
        return first

    async def request(
        self, sender: AgentRef, recipient: AgentRef, new: NewMessage, *, wait: float
    ) -> tuple[MessageRow, MessageRow]:
        """Sends a request and waits up to ``wait`` seconds for its response; the response
        is acknowledged by this delivery. DeadlineExceeded (TIMEOUT_ERROR) when none came."""
        new = check(replace(new, type="request"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        if new.message_id:
            # A repeat waits on the correlation id the stored request carries.
            async with self.db.session() as s:
                first = await MessageStore(s).get(new.message_id)
            if (
                first is not None
                and first.from_agent == sender.agent_id
                and not expired(first, now())
            ):
                if first.type != "request":
                    # A repeat of it would wait for a response nothing can send.
                    raise AlreadyExists(
                        f"message_id names a message of type {first.type}, not a request",
                        details={"field": "message_id"},
                    )
                new = replace(new, correlation_id=first.correlation_id)
        new = replace(new, correlation_id=new.correlation_id or f"corr-{uuid.uuid4().hex}")
        # Registered before the request is stored, so that no wake-up is missed.
        waiter = self.hub.expect(sender.agent_id, new.correlation_id, recipient.agent_id)
        try:
            until = now() + timedelta(seconds=wait)
            request, created = await self.send(sender, recipient, new, awaited_until=until)
            # A new request has no response yet, and the waiter hears of any that comes; a
            # repeat may find one that came meanwhile.
            look = not created
            while True:
                offered = waiter.take()
                if offered is not None:
                    if offered.acked_at is None:
                        offered = await self._acknowledged(offered)
                    return request, await self._answered(request, offered)
                if look:
                    response = await self._claim_response(request)
                    if response is not None:
                        return request, await self._answered(request, response)
                left = deadline - loop.time()
                if left <= 0:
                    raise DeadlineExceeded(
                        "no response before the deadline",
                        details={
                            "correlation_id": request.correlation_id,
                            "message_id": request.message_id,
                            "timeout_ms": round(wait * 1000),
                        },
                    )
                await waiter.wait(min(left, self.poll_seconds))
                look = True
        finally:
            waiter.close()

    async def _answered(self, request: MessageRow, response: MessageRow) -> MessageRow:
        """``response``, once ``request`` no longer holds back its responses: another one
        from the same agent goes to the requester's inbox at once, not when the wait would
        have ended. Best effort: the response is the caller's either way, and the hold ends
        with the request's wait."""
        try:
            async with self.db.write() as s, s.begin():
                await MessageStore(s).await_response(request.message_id, None)
        except SQLAlchemyError as exc:
            log.warning("could not end a request's wait: %s", exc)
        return response

    async def _claim_response(self, request: MessageRow) -> MessageRow | None:
        """The response to ``request`` in the database, acknowledged, or None."""
        at = now()
        async with self.db.session() as s:
            found = await MessageStore(s).response_to(
                request.from_agent,
                request.to_agent,
                request.correlation_id,
                since=aware(request.created_at),
                at=at,
            )
        if found is None or found.acked_at is not None:
            return found
        return await self._acknowledged(found)

    async def _acknowledged(self, response: MessageRow) -> MessageRow:
        """``response``, acknowledged by its delivery to the waiting requester."""
        at = now()
        async with self.db.write() as s, s.begin():
            store = MessageStore(s)
            if await store.ack(response.message_id, at):
                return copy(response, acked_at=at)
            # Another delivery acknowledged it first (or it expired and was swept): keep
            # the time that delivery gave it.
            first = await store.get(response.message_id)
        return first or copy(response, acked_at=at)

    async def ack(self, agents: Collection[str], message_id: str) -> MessageRow:
        """Acknowledges a message addressed to one of ``agents`` (the caller's)."""
        if not ID_PATTERN.match(message_id):
            raise _not_found(message_id)
        at = now()
        async with self.db.write() as s, s.begin():
            store = MessageStore(s)
            row = await store.get(message_id)
            if row is None or row.to_agent not in agents or expired(row, at):
                raise _not_found(message_id)
            acked_now = row.acked_at is None and await store.ack(message_id, at)
            if row.acked_at is None and not acked_now:
                # Another ack committed between the read and the UPDATE (PostgreSQL): answer
                # the time it recorded, not "unacknowledged".
                row = await store.get(message_id, fresh=True) or row
        if acked_now:
            row.acked_at = at  # after the commit, on the detached row: no second UPDATE
        return row

    async def inbox(
        self, agent_id: str, *, unacked: bool, page: Page
    ) -> tuple[Sequence[MessageRow], int, Page]:
        """The page's messages, how many the inbox holds, and the page served: ``page``, or
        one that ends early when the payloads pass PAGE_MAX_BYTES characters."""
        async with self.db.session() as s:
            rows, total = await MessageStore(s).page(
                agent_id,
                unacked=unacked,
                at=now(),
                limit=page.limit,
                offset=page.offset,
                budget=PAGE_MAX_BYTES,
            )
        return rows, total, page.read(len(rows), total)

    async def sweep_once(self, *, batch: int = SWEEP_BATCH) -> int:
        """Deletes messages whose TTL has ended; returns how many."""
        deleted = 0
        while True:
            async with self.db.write() as s, s.begin():
                store = MessageStore(s)
                seqs = await store.expired(now(), batch)
                if seqs:
                    deleted += await store.delete(seqs)
            if len(seqs) < batch:
                return deleted

    async def sweep(self, *, every: float = SWEEP_SECONDS) -> None:
        """Runs for the life of the server: expired messages are deleted."""
        while True:
            await asyncio.sleep(every)
            try:
                gone = await self.sweep_once()
            except Exception:  # a database hiccup must not end the sweeper
                log.exception("message sweep failed")
                continue
            if gone:
                log.info("expired messages deleted", extra={"count": gone})
