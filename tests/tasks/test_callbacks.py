"""Task callbacks with real parts: tasks ended through the domain, their events published by the
outbox relay to each bus, the worker reading them in its consumer group, and an HTTP receiver on
127.0.0.1; on each database."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from sqlalchemy import func, select

from servers.common.bus import Bus
from servers.common.db import Database
from servers.common.outbox import EVENTS_TOPIC, Relay
from servers.common.redisbus import RedisBus
from servers.tasks.callbacks import GROUP, CallbackWorker, check_url, forbidden
from servers.tasks.dispatch import Dispatch
from servers.tasks.domain import Tasks
from servers.tasks.models import OutboxRow
from tests.common.test_bus import bus, restart  # noqa: F401  (bus: the fixture, on each bus)
from tests.conftest import RedisServer
from tests.tasks.test_domain import ALICE, NEW, _db

SECRET = b"test-callback-secret"
# Short enough for fast tests; min_idle must exceed the delivery timeout.
FAST = {"timeout": 0.4, "min_idle": 0.5}


@dataclass
class Request:
    at: float
    line: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP/1.1 server on 127.0.0.1 that records every request and answers it with the next
    status of ``script`` (None: never answers), then with ``default``."""

    script: list[int | None] = field(default_factory=list)
    default: int = 200
    delay: float = 0.0
    requests: list[Request] = field(default_factory=list)
    url: str = ""
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hooks/tasks?token=t0p"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._handlers.add(me)
        self._writers.add(writer)
        try:
            while True:  # one connection carries several requests (keep-alive)
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                line, *rest = head.split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (h.partition(":") for h in rest if h)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(Request(time.monotonic(), line, headers, body))
                status = self.script.pop(0) if self.script else self.default
                if status is None:
                    await self._closing.wait()  # hangs until the test ends
                    return
                await asyncio.sleep(self.delay)
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)
            self._handlers.discard(me)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        # Handlers end on their own (cancelling them makes asyncio log an error on 3.11).
        self._closing.set()
        for writer in list(self._writers):
            writer.close()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        await self._server.wait_closed()


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


class Parts:
    """The relay and the workers of a test, on one database and one bus."""

    def __init__(self, db: Database, event_bus: Bus) -> None:
        self.db, self.bus = db, event_bus
        self.tasks = Tasks(db=db)
        self.dispatch = Dispatch(db=db, lease_seconds=30)
        self.jobs: list[asyncio.Task[None]] = []
        self.workers: list[CallbackWorker] = []
        relay = Relay(
            db=db, model=OutboxRow, bus=event_bus, retention_seconds=3600, max_len=100_000
        )
        self.jobs.append(asyncio.create_task(relay.run(), name="relay"))

    async def worker(self, **options: Any) -> tuple[CallbackWorker, asyncio.Task[None]]:
        w = CallbackWorker(
            db=self.db, bus=self.bus, secret=SECRET, **{"allow_private": True, **FAST, **options}
        )
        job = asyncio.create_task(w.run(), name=f"worker {w.consumer}")
        self.jobs.append(job)
        self.workers.append(w)
        await asyncio.wait_for(w.started.wait(), 5)
        return w, job

    async def close(self) -> None:
        crashed = [j for j in self.jobs if j.done() and not j.cancelled() and j.exception()]
        for job in self.jobs:
            job.cancel()
        _, stuck = await asyncio.wait(self.jobs, timeout=10)
        for job in stuck:  # a job that ignores cancellation: show where it is
            job.print_stack()
        assert not crashed and not stuck, (crashed, stuck)

    # Tasks that end, for real.

    async def completed(self, callback_url: str, result: dict[str, Any] | None = None) -> str:
        task, _ = await self.tasks.create(ALICE, replace(NEW, callback_url=callback_url))
        held = await self.dispatch.claim("agent-1", ["echo"])
        assert held is not None and held.task_id == task.task_id
        done = await self.dispatch.complete(
            task.task_id, "agent-1", held.attempt_token or "", result=result or {}, error=None
        )
        assert done.accepted and done.status == "completed"
        return task.task_id

    async def failed(self, callback_url: str) -> str:
        task, _ = await self.tasks.create(ALICE, replace(NEW, callback_url=callback_url))
        held = await self.dispatch.claim("agent-1", ["echo"])
        assert held is not None and held.task_id == task.task_id
        error = ("BAD_INPUT", "cannot echo that", False)
        done = await self.dispatch.complete(
            task.task_id, "agent-1", held.attempt_token or "", result=None, error=error
        )
        assert done.status == "failed"
        return task.task_id

    async def cancelled(self, callback_url: str) -> str:
        task, _ = await self.tasks.create(ALICE, replace(NEW, callback_url=callback_url))
        await self.tasks.cancel(ALICE, task.task_id)
        return task.task_id

    async def stopped(self, callback_url: str) -> str:
        task, _ = await self.tasks.create(ALICE, replace(NEW, callback_url=callback_url))
        await self.tasks.stop(ALICE, task.task_id)
        return task.task_id

    async def settled(self) -> None:
        """Waits until every event written so far was handled and acknowledged, and checks that
        nothing is left pending in the group."""
        async with self.db.session() as s:
            written = int((await s.execute(select(func.count(OutboxRow.id)))).scalar_one())
        await until(lambda: sum(w.acked for w in self.workers) >= written)
        probe = await self.bus.claim_stale(EVENTS_TOPIC, GROUP, "probe", min_idle=0, count=1000)
        assert probe == []

    async def event_id(self, event_type: str, task_id: str) -> str:
        entries = await self.bus.range(EVENTS_TOPIC, "0-0", 10_000)
        found = [
            e.id
            for e in entries
            if e.fields["type"] == event_type and e.fields["subject"] == task_id
        ]
        assert len(found) == 1
        return found[0]


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await _db(database_url)
    yield database
    await database.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.close()


@pytest.fixture
async def parts(db: Database, bus: Bus) -> AsyncIterator[Parts]:  # noqa: F811
    p = Parts(db, bus)
    yield p
    await p.close()


def signed(request: Request, secret: bytes = SECRET) -> bool:
    """What a receiver does (docs/callbacks.md)."""
    expected = "sha256=" + hmac.new(secret, request.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, request.headers.get("x-agentmesh-signature", ""))


async def test_a_completed_task_calls_back_once_signed(parts: Parts, receiver: Receiver) -> None:
    await parts.worker()
    task_id = await parts.completed(receiver.url, {"answer": 42})
    await receiver_count(receiver, 1)
    await parts.settled()
    await asyncio.sleep(2 * FAST["min_idle"])  # a few claim rounds: nothing is sent again
    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert request.line == "POST /hooks/tasks?token=t0p HTTP/1.1"
    event_id = await parts.event_id("task.completed", task_id)
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("agentmesh/")
    assert request.headers["x-agentmesh-event-id"] == event_id
    assert signed(request) and not signed(request, b"another secret")
    body = request.json()
    assert body["event_type"] == "task.completed" and body["event_id"] == event_id
    assert (body["task_id"], body["status"], body["result"]) == (
        task_id,
        "completed",
        {"answer": 42},
    )
    task = body["task"]
    assert task["task_id"] == task_id and task["status"] == "completed"
    assert task["result"] == {"answer": 42} and task["attempt"] == 1
    assert task["error"] == "" and task["error_code"] == ""
    assert task["completed_at"] and task["started_at"] and task["cancelled_at"] is None


async def receiver_count(receiver: Receiver, n: int) -> None:
    await until(lambda: len(receiver.requests) >= n)


async def test_only_ended_tasks_with_a_callback_are_called(
    parts: Parts, receiver: Receiver
) -> None:
    worker, _ = await parts.worker()
    await parts.completed("")  # no callback_url: no request
    cancelled = await parts.cancelled(receiver.url)
    failed = await parts.failed(receiver.url)
    stopped = await parts.stopped(receiver.url)
    await parts.settled()
    await asyncio.sleep(2 * FAST["min_idle"])
    # created, queued and assigned events of the same tasks were acknowledged, not sent.
    got = sorted((r.json()["event_type"], r.json()["task"]["task_id"]) for r in receiver.requests)
    expected = [("task.cancelled", cancelled), ("task.failed", failed), ("task.stopped", stopped)]
    assert got == sorted(expected)
    bodies = {r.json()["event_type"]: r.json()["task"] for r in receiver.requests}
    assert bodies["task.cancelled"]["status"] == "cancelled"
    assert bodies["task.cancelled"]["cancelled_at"] and bodies["task.cancelled"]["result"] is None
    assert bodies["task.failed"]["status"] == "failed"
    assert bodies["task.failed"]["error_code"] == "BAD_INPUT"
    assert bodies["task.stopped"]["status"] == "stopped"
    assert (worker.delivered, worker.failed, worker.refused) == (3, 0, 0)


async def test_a_failed_delivery_is_sent_again_after_min_idle(
    parts: Parts, receiver: Receiver
) -> None:
    receiver.script = [500]
    worker, _ = await parts.worker()
    await parts.completed(receiver.url)
    await receiver_count(receiver, 2)
    await parts.settled()
    await asyncio.sleep(2 * FAST["min_idle"])
    first, second = receiver.requests  # acknowledged after the 200: no third request
    # Pending since it was read, a little before the first request: claimed after min_idle.
    assert second.at - first.at >= FAST["min_idle"] - 0.2
    assert first.body == second.body
    assert first.headers["x-agentmesh-event-id"] == second.headers["x-agentmesh-event-id"]
    assert (worker.delivered, worker.failed) == (1, 1)


async def test_an_entry_of_a_worker_that_died_is_delivered_by_another(
    parts: Parts, receiver: Receiver
) -> None:
    receiver.script = [None]  # the first request hangs: its worker dies waiting
    dying, job = await parts.worker()
    task_id = await parts.completed(receiver.url)
    await receiver_count(receiver, 1)
    job.cancel()
    await asyncio.gather(job, return_exceptions=True)
    assert dying.delivered == 0
    other, _ = await parts.worker()
    await receiver_count(receiver, 2)
    assert receiver.requests[1].at - receiver.requests[0].at >= FAST["min_idle"] - 0.2
    assert receiver.requests[1].json()["task"]["task_id"] == task_id
    assert receiver.requests[0].body == receiver.requests[1].body
    await parts.settled()  # every entry acknowledged by one of the two, none left pending
    assert other.delivered == 1 and other.consumer != dying.consumer
    assert len(receiver.requests) == 2


async def test_a_private_address_is_refused(
    parts: Parts, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    worker, _ = await parts.worker(allow_private=False)
    port = receiver.url.split(":")[2].split("/")[0]
    await parts.completed(receiver.url)
    await parts.completed(f"http://localhost:{port}/")
    await parts.settled()
    await asyncio.sleep(2 * FAST["min_idle"])
    assert receiver.requests == []  # never connected
    assert worker.refused == 2 and worker.delivered == 0
    refusals = [
        r
        for r in caplog.records
        if r.name == "agentmesh.callbacks" and r.levelno == logging.WARNING
    ]
    assert len(refusals) == 2
    assert all("t0p" not in r.getMessage() for r in caplog.records)  # nor logged the URL


async def test_two_workers_deliver_each_event_once(parts: Parts, receiver: Receiver) -> None:
    receiver.delay = 0.05
    workers = [(await parts.worker(batch=1))[0] for _ in range(2)]
    sent = [await parts.completed(receiver.url, {"n": n}) for n in range(6)]
    await receiver_count(receiver, 6)
    await parts.settled()
    await asyncio.sleep(2 * FAST["min_idle"])
    got = [r.json()["task"]["task_id"] for r in receiver.requests]
    assert sorted(got) == sorted(sent)
    assert sum(w.delivered for w in workers) == 6


async def test_a_dead_endpoint_is_given_up_after_max_age(parts: Parts, receiver: Receiver) -> None:
    receiver.default = 503
    worker, _ = await parts.worker(max_age=1.0)
    await parts.completed(receiver.url)
    await until(lambda: worker.given_up == 1)
    await parts.settled()
    tries = len(receiver.requests)
    assert tries >= 2  # tried again before giving up
    await asyncio.sleep(2 * FAST["min_idle"])
    assert len(receiver.requests) == tries


async def test_the_worker_outlives_a_redis_outage(
    db: Database, receiver: Receiver, redis_server: RedisServer
) -> None:
    url, proc = redis_server
    redis_bus = RedisBus(url, prefix="agentmesh-test:")
    parts = Parts(db, redis_bus)
    again = None
    try:
        worker, job = await parts.worker()
        proc.kill()
        proc.wait()
        await until(lambda: not worker.up)
        await asyncio.sleep(0.5)
        assert not job.done()
        again = await restart(redis_server)  # empty: the group is gone with the data
        task_id = await parts.completed(receiver.url)
        await receiver_count(receiver, 1)
        assert receiver.requests[0].json()["task"]["task_id"] == task_id
        await until(lambda: worker.up and worker.delivered == 1)
    finally:
        await parts.close()
        await redis_bus.close()
        if again is not None:
            again.kill()
            again.wait()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://localhost:8080/",
        "http://10.1.2.3/",
        "http://192.168.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[fe80::1]/",
        "ftp://example.com/",
        "file:///etc/passwd",
        "http://example.com:99999/",
    ],
)
async def test_the_guard_refuses(url: str) -> None:
    assert await check_url(url, allow_private=False)


async def test_the_guard_lets_public_addresses_and_allowed_private_ones_through() -> None:
    assert await check_url("https://8.8.8.8/hook", allow_private=False) == ""
    assert await check_url("http://[2606:4700::1111]:8443/", allow_private=False) == ""
    assert await check_url("http://127.0.0.1:9/", allow_private=True) == ""
    assert await check_url("gopher://127.0.0.1/", allow_private=True)
    # IPv4 inside IPv6 is judged as the IPv4 address it reaches.
    for embedded in ("2002:7f00:1::", "64:ff9b::a00:1", "::ffff:10.0.0.1"):
        assert forbidden(ipaddress.ip_address(embedded))
    assert not forbidden(ipaddress.ip_address("64:ff9b::808:808"))
