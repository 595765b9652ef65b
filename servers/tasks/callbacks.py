"""Task callbacks: a POST to the task's ``callback_url`` when the task ends.

The worker reads the bus topic "events" in the consumer group "task-callbacks": with several
processes on one Redis, each event goes to one of them. Events of an ended task (completed,
failed, cancelled, stopped) whose task has a callback URL are delivered; every other event is
acknowledged at once. A 2xx answer acknowledges the entry; anything else leaves it pending in
the group, and every worker periodically claims entries pending for ``min_idle`` seconds (its
own failures, or those of a worker that died mid-delivery) and tries them again. An entry still
failing ``max_age`` seconds after it was published is given up (a new entry is always tried
once). Delivery is at least once: a worker that dies after the POST but before its ack has the
event sent again, so receivers de-duplicate on the event id (or on task id and status, which
also covers the rare event the outbox relay published twice, under two ids).

The body is signed with HMAC-SHA256 under a secret of the mesh (``x-agentmesh-signature:
sha256=<hex>``, over the exact body bytes); docs/callbacks.md tells receivers how to check it.

SSRF guard: only http and https, and unless ``allow_private`` every address the host resolves
to must be public (not loopback, private, link-local, multicast, reserved or unspecified, IPv4
inside IPv6 included). The host is resolved here and then again by the HTTP client when it
connects, so a name whose DNS answer changes in between (DNS rebinding, a short TTL) can still
reach an internal address. Closing that needs the connection to go to the checked address:
a transport that connects to it while keeping the URL's host for the Host header and TLS SNI,
or an egress proxy that applies the same rule at connect time (e.g. Stripe's smokescreen).
Redirects are not followed, so a 3xx cannot point the request elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib.metadata
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.exc import SQLAlchemyError

from servers.common.bus import Bus, BusUnavailable, Entry, parse_id
from servers.common.clock import aware
from servers.common.db import Database
from servers.common.observability import OBSERVED
from servers.common.outbox import EVENTS_TOPIC

from .models import TaskRow
from .store import TaskStore

log = logging.getLogger("agentmesh.callbacks")

GROUP = "task-callbacks"
# The events of a task that ended (servers/tasks/domain.py and dispatch.py write them).
ENDED = frozenset({"task.completed", "task.failed", "task.cancelled", "task.stopped"})
# While events flow (a read returned some, but not a full batch), the worker waits this long
# before reading again, so that each read and its acknowledgement cover many entries rather
# than one: a callback may go out this much later under load, never when the topic is quiet.
LINGER = 0.05
SIGNATURE_HEADER = "x-agentmesh-signature"
EVENT_ID_HEADER = "x-agentmesh-event-id"
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _version() -> str:
    try:
        return importlib.metadata.version("agentmesh")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def forbidden(ip: Address) -> bool:
    """Whether a callback may not connect to ``ip`` (unless private addresses are allowed)."""
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv4-mapped and NAT64 addresses reach the IPv4 address they carry: judge that one.
        if ip.ipv4_mapped is not None:
            return forbidden(ip.ipv4_mapped)
        if ip in _NAT64:
            return forbidden(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None and forbidden(ip.sixtofour):
            return True
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global  # shared (100.64/10), benchmarking and other special ranges
    )


# A host name as DNS has it once IDNA-encoded: letters, digits, hyphens (and the underscores
# some internal names carry), in dot-separated labels.
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")


def url_problem(url: str) -> str:
    """What makes ``url`` unusable as a callback address, whatever it resolves to, or "": the
    checks a create makes, so that a URL no delivery could use is refused at once."""
    if any(c <= " " or c == "\x7f" for c in url):
        return "malformed URL: it holds a space or a control character"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check: out of range raises
    except ValueError as exc:
        return f"malformed URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http or https URL"
    try:
        ipaddress.ip_address(parts.hostname)
        return ""
    except ValueError:
        pass
    try:
        ascii_host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        return "malformed URL: a bad host name"
    return "" if _HOST_NAME.fullmatch(ascii_host) else "malformed URL: a bad host name"


async def check_url(url: str, *, allow_private: bool) -> str:
    """Why a callback to ``url`` is refused, or "" when it may be sent. Resolves the host
    (every address must be allowed); a failed resolution raises OSError (tried again later)."""
    problem = url_problem(url)
    if problem or allow_private:
        return problem
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    infos = await asyncio.get_running_loop().getaddrinfo(
        parts.hostname, port, type=socket.SOCK_STREAM
    )
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])  # drop an IPv6 zone
        if forbidden(ip):
            return f"{parts.hostname} resolves to a non-public address ({ip})"
    return ""


def _time(value: datetime | None) -> str | None:
    """RFC 3339 in UTC, as the REST API prints times."""
    if value is None:
        return None
    return aware(value).astimezone(UTC).isoformat().replace("+00:00", "Z")


def task_payload(task: TaskRow) -> dict[str, Any]:
    """The task as a callback shows it."""
    return {
        "task_id": task.task_id,
        "type": task.type,
        "title": task.title,
        "status": task.status,
        "result": task.result,
        "error": task.error,
        "error_code": task.error_code,
        "attempt": task.attempt,
        "idempotency_key": task.idempotency_key or "",
        "metadata": task.task_metadata,
        "created_at": _time(task.created_at),
        "started_at": _time(task.started_at),
        "completed_at": _time(task.completed_at),
        "cancelled_at": _time(task.cancelled_at),
    }


def callback_body(event_type: str, event_id: str, task: TaskRow) -> bytes:
    payload = task_payload(task)
    body = {
        "event_type": event_type,
        "event_id": event_id,
        # Seed 004's flat shape, kept for receivers written against it.
        "task_id": task.task_id,
        "status": task.status,
        "result": task.result,
        "task": payload,
    }
    return json.dumps(body, separators=(",", ":"), default=str).encode()


def consumer_name() -> str:
    """Unique per process (and per worker): host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _may_call_back(entry: Entry) -> bool:
    """False when the event says its task has no callback URL (events written before the
    tasks service said so count as "maybe": the task is read)."""
    try:
        data = json.loads(entry.fields.get("data", "{}"))
    except ValueError:
        return True
    return not (isinstance(data, dict) and data.get("callback") is False)


def _calls_back(entry: Entry) -> bool:
    """Whether an event may need a callback: a task's end, of a task that may have a URL."""
    return entry.fields.get("type", "") in ENDED and _may_call_back(entry)


class CallbackWorker:
    """Delivers task callbacks from the events topic; ``run`` is its background job.

    ``min_idle`` is how long an entry stays pending (a failed delivery, or a worker that died)
    before any worker of the group claims it and tries again; it must exceed ``timeout``, the
    most one delivery may take, or an entry still being delivered could be claimed twice.
    ``max_age`` (seconds since the event was published) ends the retries of an entry.
    """

    def __init__(
        self,
        *,
        db: Database,
        bus: Bus,
        secret: str | bytes,
        allow_private: bool = False,
        timeout: float = 5.0,
        min_idle: float = 30.0,
        max_age: float = 3600.0,
        batch: int = 16,
        topic: str = EVENTS_TOPIC,
        group: str = GROUP,
        consumer: str | None = None,
    ) -> None:
        if not secret:
            raise ValueError("a callback signing secret is required")
        if min_idle <= timeout:
            raise ValueError("min_idle must be longer than the delivery timeout")
        self._db = db
        self._bus = bus
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self._allow_private = allow_private
        self._timeout = timeout
        self._min_idle = min_idle
        self._max_age = max_age
        self._batch = batch
        self._topic = topic
        self._group = group
        self.consumer = consumer or consumer_name()
        self._user_agent = f"agentmesh/{_version()}"
        # Set once the group exists: events published from then on are delivered.
        self.started = asyncio.Event()
        # Whether the last bus call succeeded, and what became of the entries handled.
        self.up = True
        self.delivered = self.failed = self.refused = self.given_up = self.acked = 0

    async def run(self) -> None:
        delay = 0.1
        claim_every = self._min_idle / 2
        next_claim = 0.0
        async with httpx.AsyncClient(
            timeout=self._timeout,
            follow_redirects=False,
            # No proxy variables and no .netrc credentials sent to callback hosts.
            trust_env=False,
        ) as client:
            while True:
                try:
                    if not self.started.is_set():
                        await self._bus.ensure_group(self._topic, self._group)
                        self.started.set()
                    if time.monotonic() >= next_claim:
                        claimed = await self._bus.claim_stale(
                            self._topic,
                            self._group,
                            self.consumer,
                            min_idle=self._min_idle,
                            count=self._batch,
                        )
                        # A full batch: more may be waiting, claim again after this round.
                        full = len(claimed) >= self._batch
                        next_claim = time.monotonic() + (0 if full else claim_every)
                        await self._handle(client, claimed, retry=True)
                    block = min(max(0.0, next_claim - time.monotonic()), 5.0)
                    entries = await self._bus.read_group(
                        self._topic, self._group, self.consumer, count=self._batch, block=block
                    )
                    await self._handle(client, entries, retry=False)
                    if 0 < len(entries) < self._batch:
                        await asyncio.sleep(LINGER)
                except BusUnavailable as exc:
                    if self.up:
                        log.warning("bus unavailable; task callbacks wait")
                        log.debug("bus error: %s", exc)
                    self.up = False
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                except Exception:
                    # Whatever went wrong, the entries stay pending and are claimed again.
                    log.exception("task callback round failed")
                    await asyncio.sleep(1.0)
                    continue
                if not self.up:
                    log.info("bus available again; task callbacks resumed")
                self.up, delay = True, 0.1

    async def _handle(
        self, client: httpx.AsyncClient, entries: list[Entry], *, retry: bool
    ) -> None:
        if not entries:
            return
        # Most events call nothing back: they are acknowledged without a task each.
        calls: list[Entry] = []
        ids: list[str] = []
        for entry in entries:
            if _calls_back(entry):
                calls.append(entry)
            else:
                ids.append(entry.id)
        if calls:
            done = await asyncio.gather(*(self._one(client, e, retry=retry) for e in calls))
            ids += [e.id for e, ack in zip(calls, done, strict=True) if ack]
        if ids:
            await self._bus.ack(self._topic, self._group, ids)
            self.acked += len(ids)

    async def _one(self, client: httpx.AsyncClient, entry: Entry, *, retry: bool) -> bool:
        """Handles one entry that may call back (_calls_back); True when it is done with
        (acknowledge it)."""
        event_type = entry.fields.get("type", "")
        task_id = entry.fields.get("subject", "")
        where = {"event_id": entry.id, "task_id": task_id}
        # A new entry is always tried once; a retried one only within max_age of publication.
        if retry and time.time() - parse_id(entry.id)[0] / 1000 > self._max_age:
            log.warning("task callback given up after %.0f s", self._max_age, extra=where)
            self.given_up += 1
            return True
        try:
            async with asyncio.timeout(self._timeout):
                return await self._deliver(client, entry, event_type, task_id, where)
        except (TimeoutError, OSError, httpx.HTTPError, SQLAlchemyError) as exc:
            log.info("task callback failed (%s); will retry", type(exc).__name__, extra=where)
        except Exception:
            log.exception("task callback failed; will retry", extra=where)
        self.failed += 1
        return False

    async def _deliver(
        self,
        client: httpx.AsyncClient,
        entry: Entry,
        event_type: str,
        task_id: str,
        where: dict[str, str],
    ) -> bool:
        async with self._db.session() as s:
            task = await TaskStore(s).get(task_id)
        if task is None or not task.callback_url:
            return True
        url = task.callback_url
        host = urlsplit(url).hostname or ""
        where["host"] = host  # the URL itself is logged nowhere: it may carry a token
        refused = await check_url(url, allow_private=self._allow_private)
        if refused:
            log.warning("task callback refused: %s", refused, extra=where)
            self.refused += 1
            return True
        body = callback_body(event_type, entry.id, task)
        headers = {
            "content-type": "application/json",
            "user-agent": self._user_agent,
            EVENT_ID_HEADER: entry.id,
            SIGNATURE_HEADER: sign(self._secret, body),
        }
        # Streamed, so that the response body is never read: only its status counts.
        OBSERVED.external += 1
        async with client.stream("POST", url, content=body, headers=headers) as response:
            status = response.status_code
        if 200 <= status < 300:
            self.delivered += 1
            return True
        log.info("task callback answered %d; will retry", status, extra=where)
        self.failed += 1
        return False
