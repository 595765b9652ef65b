"""The worker side of AgentsService.Connect: a small API for writing agents.

    agent = Agent(name="worker-1", capabilities=["echo"], capacity=2, api_key=key)

    @agent.handler("echo")
    async def echo(task: tasks_pb2.Task, report: Progress) -> dict[str, object]:
        await report(50, "halfway")
        return {"echo": task.description}

    await agent.run()  # until agent.stop(), SIGTERM or SIGINT

One connection runs three asyncio tasks: a reader of the server's frames, the only writer of the
stream (grpc.aio allows one write at a time, and a handler must never wait on the network), and a
heartbeat. Handlers run as tasks of their own and outlive a connection: an outcome that finds no
stream waits in `_pending`, is sent first on the next connection, and is kept until the server
acknowledges it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import random
import re
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2

from agentmesh.v1 import agents_pb2, agents_pb2_grpc, tasks_pb2
from servers.common.protos import NESTING_MAX, json_size, too_deep
from servers.common.text import TYPE_NAME, TYPE_RULE, invisible

log = logging.getLogger("agentmesh.agent")

DEFAULT_TARGET = "127.0.0.1:8080"
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # The channel's own reconnection backoff, which a Connect made while it is down waits on:
    # gRPC's default grows to two minutes, so after a long outage the agent came back up to
    # half a minute after the mesh did. Kept to the agent's own (Backoff: 0.2 s up to 5 s).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5000),
)
HELLO_TIMEOUT = 15.0
DEFAULT_HEARTBEAT_SECONDS = 10
# Progress is a gauge: a handler reporting in a tight loop must not turn into a database write
# per call on the tasks service.
PROGRESS_INTERVAL = 0.2
OUTBOX_LIMIT = 1000
MESSAGE_LIMIT = 500
ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}\Z")  # as the mesh checks it (agents/http.py)
DETAILS_MAX_BYTES = 64 * 1024
# The largest result the mesh keeps (servers/tasks/dispatch.py's RESULT_MAX_BYTES).
RESULT_MAX_BYTES = 1 << 20
# On stop(): how long to wait for the server to acknowledge finished outcomes, and for a
# cancelled handler to actually end.
DRAIN_SECONDS = 3.0
CANCEL_GRACE = 5.0
FATAL_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
MAX_CAPACITY = 1000


def _version() -> str:
    try:
        return importlib.metadata.version("agentmesh")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def _text(message: str) -> str:
    """A message as the mesh takes it: at most MESSAGE_LIMIT characters and no NUL (the mesh
    refuses a frame with a NUL in any text field, and ends the stream that sent it)."""
    return message[:MESSAGE_LIMIT].replace("\x00", "\ufffd")


class TaskFailed(Exception):
    """Raised by a handler: the attempt failed with a documented UPPER_SNAKE code. A retryable
    failure is queued again while the task has attempts left; any other fails the task."""

    def __init__(
        self,
        code: str,
        message: str,
        retryable: bool = False,
        *,
        details: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.details = dict(details or {})

    def to_proto(self) -> tasks_pb2.TaskError:
        """The error as the mesh takes it: an UPPER_SNAKE code (another becomes INTERNAL_ERROR,
        named in the message), a message of 1 to 500 characters, details of at most 64 KiB of
        JSON (larger ones are left out). The mesh refuses an outcome outside those rules, and
        a refused outcome would leave the task held until its time limit. A NUL character,
        which no text field may hold, becomes U+FFFD."""
        code, message = self.code, self.message or self.code or "failed"
        if not ERROR_CODE.match(code):
            code, message = "INTERNAL_ERROR", f"{self.code!r}: {message}"
        error = tasks_pb2.TaskError(code=code, message=_text(message), retryable=self.retryable)
        if self.details:
            try:
                _json_struct(self.details, error.details, DETAILS_MAX_BYTES)
            except _NOT_JSON:
                error.ClearField("details")
        return error


class AgentRefused(Exception):
    """The mesh will not have this agent, and trying again would not change that: its API key
    was refused (UNAUTHENTICATED, PERMISSION_DENIED), its Hello was (VALIDATION_ERROR), or
    another worker connected with the same name (REPLACED)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Progress(Protocol):
    """What a handler calls to report progress, 0-100, with an optional message."""

    async def __call__(self, progress: int, message: str = "") -> None: ...


Handler = Callable[[tasks_pb2.Task, Progress], Awaitable[Mapping[str, object]]]
H = TypeVar("H", bound=Handler)
Outcome: TypeAlias = struct_pb2.Struct | tasks_pb2.TaskError


class _Usage:
    """This process's resource use for its heartbeats (seed 004's agent resources): CPU in
    percent of one core since the last reading, resident memory and the machine's memory in
    MiB (Linux's /proc; zeros elsewhere)."""

    def __init__(self) -> None:
        self._cpu, self._at = self._cpu_seconds(), time.monotonic()

    @staticmethod
    def _cpu_seconds() -> float:
        times = os.times()
        return times.user + times.system

    @staticmethod
    def _mib(path: str, key: str) -> float:
        try:
            with open(path) as lines:
                for line in lines:
                    if line.startswith(key):
                        return int(line.split()[1]) / 1024  # kB
        except OSError:
            pass
        return 0.0

    def now(self) -> agents_pb2.AgentResources:
        cpu, at = self._cpu_seconds(), time.monotonic()
        percent = 100 * (cpu - self._cpu) / (at - self._at) if at > self._at else 0.0
        self._cpu, self._at = cpu, at
        return agents_pb2.AgentResources(
            cpu_usage=round(max(0.0, percent), 1),
            memory_usage=round(self._mib("/proc/self/status", "VmRSS:"), 1),
            memory_limit=round(self._mib("/proc/meminfo", "MemTotal:"), 1),
        )


def metadata_of(task: tasks_pb2.Task) -> dict[str, Any]:
    """The task's metadata as plain JSON values (every number is a float, as in Struct)."""
    return json_format.MessageToDict(task.metadata)


# What a value that is not a JSON object raises on its way into a Struct (an integer beyond a
# double's range: OverflowError).
_NOT_JSON = (json_format.ParseError, TypeError, ValueError, OverflowError)


def _json_struct(
    value: Mapping[str, object], into: struct_pb2.Struct, max_bytes: int | None = None
) -> struct_pb2.Struct:
    """``value`` parsed into ``into``, as the mesh will take it: a number JSON cannot write
    (NaN, Infinity), which a Struct would carry and the mesh refuses, raises ValueError, as
    does a value over ``max_bytes`` of JSON."""
    text = json.dumps(value, allow_nan=False, default=str)
    if max_bytes is not None and len(text) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes of JSON")
    json_format.ParseDict(dict(value), into)
    return into


async def execute(handler: Handler, task: tasks_pb2.Task, report: Progress) -> Outcome:
    """Runs a handler and turns what it did into a TaskResult's outcome."""
    try:
        result = await handler(task, report)
    except TaskFailed as exc:
        return exc.to_proto()
    except Exception as exc:
        log.exception("handler failed", extra={"task_id": task.task_id})
        return tasks_pb2.TaskError(
            code="INTERNAL_ERROR",
            message=_text(str(exc)) or type(exc).__name__,
            retryable=True,
        )
    if too_deep(result):
        # Too deep for the stream to carry (the mesh could not decode the frame) or to keep.
        return tasks_pb2.TaskError(
            code="RESULT_TOO_DEEP",
            message=f"the handler's result nests deeper than {NESTING_MAX} levels",
            retryable=False,
        )
    try:
        outcome = _json_struct(result, struct_pb2.Struct())
    except _NOT_JSON as exc:
        # The same handler would produce the same result again: retrying cannot help.
        return tasks_pb2.TaskError(
            code="INTERNAL_ERROR",
            message=_text(f"the handler's result is not a JSON object: {exc}"),
            retryable=False,
        )
    size = json_size(result)
    if size > RESULT_MAX_BYTES:
        # The mesh would fail the task so; sent, a result past the 4 MiB frame limit would
        # break the stream instead, and be sent again on every reconnection.
        return tasks_pb2.TaskError(
            code="RESULT_TOO_LARGE",
            message=f"the result is {size} bytes of JSON; at most {RESULT_MAX_BYTES} are kept",
            retryable=False,
        )
    return outcome


@dataclass
class Backoff:
    """Capped exponential backoff with jitter, so that agents cut off together do not all
    come back in the same instant."""

    first: float = 0.2
    cap: float = 5.0
    attempts: int = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2 ** min(self.attempts, 16))
        self.attempts += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempts = 0


class _StreamClosed(Exception):
    """The stream ended or broke in a way a reconnection may cure."""


@dataclass(eq=False)
class _Job:
    task: tasks_pb2.Task
    token: str
    runner: asyncio.Task[None] | None = None
    # Set when the outcome must not be reported: the server cancelled the task, a newer
    # attempt replaced it, or stop() came.
    dropped: bool = False


@dataclass(eq=False)
class _Pending:
    frame: agents_pb2.ConnectRequest
    sent_at: float = field(default=0.0)


class Agent:
    """An agent worker: registers handlers per task type, then `run()`s until stopped."""

    def __init__(
        self,
        *,
        name: str,
        api_key: str,
        capabilities: Iterable[str] | None = None,
        capacity: int = 1,
        target: str = DEFAULT_TARGET,
        agent_type: str = "worker",
        configuration: Mapping[str, object] | None = None,
        version: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        on_welcome: Callable[[agents_pb2.Welcome], None] | None = None,
    ) -> None:
        if not 1 <= len(name) <= 64:
            raise ValueError("name must be 1-64 characters")
        if not name.strip():
            raise ValueError("name must not be blank")
        if invisible(name):
            raise ValueError(
                "name must not hold control, format, private-use or unassigned characters"
            )
        if not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity must be 1 to {MAX_CAPACITY}")
        if not api_key:
            raise ValueError("api_key is required (an API key of the `agent` scope)")
        self.name = name
        self.capacity = capacity
        self.target = target
        self.agent_type = agent_type
        self.version = version or _version()
        self._capabilities = list(capabilities) if capabilities is not None else None
        self._defaults = dict(configuration or {})
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._credentials = credentials
        self._on_welcome = on_welcome
        self._handlers: dict[str, Handler] = {}
        # Set by the latest Welcome; `connected` is set while a stream is up.
        self.agent_id: str | None = None
        self.welcome: agents_pb2.Welcome | None = None
        self.configuration: dict[str, Any] = dict(self._defaults)
        self.connected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._started = False
        self._interval = float(DEFAULT_HEARTBEAT_SECONDS)
        self._running: dict[str, _Job] = {}
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._outbox: asyncio.Queue[agents_pb2.ConnectRequest | None] | None = None
        self._slots = asyncio.Semaphore(capacity)

    # -- the API ---------------------------------------------------------------------------

    def handler(self, task_type: str) -> Callable[[H], H]:
        """Decorator: the coroutine that carries out tasks of `task_type`."""

        def register(fn: H) -> H:
            self.add_handler(task_type, fn)
            return fn

        return register

    def add_handler(self, task_type: str, fn: Handler) -> None:
        self._handlers[task_type] = fn

    @property
    def capabilities(self) -> list[str]:
        """What the Hello announces: the given capabilities, else the handled task types."""
        return list(self._capabilities) if self._capabilities is not None else [*self._handlers]

    @property
    def running_task_ids(self) -> list[str]:
        return sorted(self._running)

    @property
    def held_task_ids(self) -> list[str]:
        """What its heartbeats list: the tasks running or waiting for a slot, and those whose
        outcome is not acknowledged yet. The server renews only the leases listed."""
        return sorted({*self._running, *(task_id for task_id, _ in self._pending)})

    @property
    def unacknowledged(self) -> list[tuple[str, str]]:
        """(task_id, attempt_token) of the outcomes sent or waiting, not yet acknowledged."""
        return sorted(self._pending)

    def handler_for(self, task: tasks_pb2.Task) -> Handler | None:
        """The task's type's handler, else that of the first required capability with one."""
        for candidate in (task.type, *task.required_capabilities):
            if candidate in self._handlers:
                return self._handlers[candidate]
        return None

    def stop(self) -> None:
        """Stops taking work, cancels the running handlers and closes the stream; `run()`
        returns.
        Call it from the event loop's thread (use loop.call_soon_threadsafe otherwise)."""
        self._stopping.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Connects and works until stop() (or SIGTERM/SIGINT when `handle_signals`),
        reconnecting whenever the stream breaks. Raises AgentRefused when the mesh refuses
        the key or another worker takes the name, ValueError for an invalid Hello."""
        if self._started:
            raise RuntimeError("an Agent runs only once")
        self._started = True
        self._check_capabilities()
        loop = asyncio.get_running_loop()
        signals = self._install_signals(loop) if handle_signals else []
        if self._credentials is not None:
            channel = grpc.aio.secure_channel(
                self.target, self._credentials, options=CHANNEL_OPTIONS
            )
        else:
            channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        stub = agents_pb2_grpc.AgentsServiceStub(channel)
        backoff = Backoff()
        log.info(
            "agent starting",
            extra={
                "agent_name": self.name,
                "target": self.target,
                "capabilities": self.capabilities,
            },
        )
        try:
            while not self._stopping.is_set():
                try:
                    await self._connection(stub, backoff)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in FATAL_CODES:
                        raise AgentRefused(exc.code().name, exc.details() or "") from exc
                    log.warning("stream broken: %s: %s", exc.code().name, exc.details())
                except _StreamClosed as exc:
                    log.warning("stream closed: %s", exc)
                if not self._stopping.is_set():
                    delay = backoff.next()
                    log.info("reconnecting in %.2f s", delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
        except AgentRefused as exc:
            log.error("the mesh refused the agent: %s", exc)
            raise
        finally:
            # Whatever still runs has no stream to report on: its leases run out.
            await self._cancel_all()
            await channel.close()
            for sig in signals:
                loop.remove_signal_handler(sig)
            log.info("agent stopped", extra={"agent_name": self.name})

    # -- one connection --------------------------------------------------------------------

    async def _connection(self, stub: Any, backoff: Backoff) -> None:
        call = stub.Connect(metadata=self._metadata)
        stopper = asyncio.ensure_future(self._stopping.wait())
        tasks: list[asyncio.Future[Any]] = [stopper]
        try:
            await call.write(agents_pb2.ConnectRequest(hello=self._hello()))
            handshake = asyncio.ensure_future(asyncio.wait_for(call.read(), HELLO_TIMEOUT))
            tasks.append(handshake)
            await asyncio.wait({handshake, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not handshake.done():
                return
            try:
                first = handshake.result()
            except TimeoutError:
                raise _StreamClosed(f"no Welcome within {HELLO_TIMEOUT:.0f} s") from None
            self._welcomed(first)
            backoff.reset()
            outbox: asyncio.Queue[agents_pb2.ConnectRequest | None] = asyncio.Queue(OUTBOX_LIMIT)
            self._outbox = outbox
            # Outcomes from before the reconnection go first, before any new work.
            for pending in self._pending.values():
                pending.sent_at = time.monotonic()
                self._send(pending.frame)
            reader = asyncio.create_task(self._read_frames(call))
            writer = asyncio.create_task(self._write_frames(call, outbox))
            tasks += [reader, writer, asyncio.create_task(self._heartbeats())]
            await asyncio.wait({reader, writer, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()
            if writer.done():
                writer.result()
            await self._drain(reader, outbox)
        finally:
            self._outbox = None
            self.connected.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            call.cancel()

    def _hello(self) -> agents_pb2.Hello:
        hello = agents_pb2.Hello(
            name=self.name,
            type=self.agent_type,
            capabilities=self.capabilities,
            max_capacity=self.capacity,
            version=self.version,
        )
        if self._defaults:
            json_format.ParseDict(self._defaults, hello.configuration)
        return hello

    def _welcomed(self, frame: Any) -> None:
        if frame is grpc.aio.EOF:
            raise _StreamClosed("the server closed the stream before its Welcome")
        kind = frame.WhichOneof("kind")
        if kind == "error":
            # Logged as an error: a refused Hello usually needs the operator (bad capability
            # list, a server that does not know this agent version), not just a retry.
            log.error("the server refused the Hello: %s: %s", frame.error.code, frame.error.message)
            if frame.error.code == "VALIDATION_ERROR":
                # The same Hello would be refused again, for ever.
                raise AgentRefused(frame.error.code, frame.error.message)
            raise _StreamClosed(f"Hello refused: {frame.error.code}")
        if kind == "end":
            raise _StreamClosed(f"the server ended the stream: {frame.end.reason}")
        if kind != "welcome":
            raise _StreamClosed(f"expected a Welcome, got {kind}")
        welcome = frame.welcome
        self.welcome = welcome
        self.agent_id = welcome.agent_id
        self._interval = float(welcome.heartbeat_interval_seconds or DEFAULT_HEARTBEAT_SECONDS)
        self.configuration = json_format.MessageToDict(welcome.configuration)
        self.connected.set()
        log.info(
            "agent connected",
            extra={"agent_id": self.agent_id, "heartbeat_seconds": self._interval},
        )
        if self._on_welcome is not None:
            try:
                self._on_welcome(welcome)
            except Exception:
                log.exception("on_welcome failed")

    async def _read_frames(self, call: Any) -> None:
        # The server pings whenever it has been quiet for an interval; silence well past that
        # means a stream that is dead end to end even if each TCP hop still looks alive.
        silence = 3 * self._interval + 5
        while True:
            try:
                frame = await asyncio.wait_for(call.read(), silence)
            except TimeoutError:
                raise _StreamClosed(f"nothing from the server for {silence:.0f} s") from None
            if frame is grpc.aio.EOF:
                raise _StreamClosed("the server closed the stream")
            kind = frame.WhichOneof("kind")
            if kind == "error":
                raise _StreamClosed(f"{frame.error.code}: {frame.error.message}")
            if kind == "end":
                if frame.end.reason == "REPLACED":
                    raise AgentRefused(
                        "REPLACED", f"another worker connected with the name {self.name!r}"
                    )
                raise _StreamClosed(f"the server ended the stream: {frame.end.reason}")
            if kind == "assignment":
                self._assigned(frame.assignment)
            elif kind == "cancellation":
                self._cancelled(frame.cancellation)
            elif kind == "result_ack":
                self._acknowledged(frame.result_ack)
            elif kind == "ping":
                self._send(agents_pb2.ConnectRequest(pong=agents_pb2.Pong(nonce=frame.ping.nonce)))
            elif kind == "config_update":
                self.configuration = json_format.MessageToDict(frame.config_update.configuration)
                log.info(
                    "configuration updated",
                    extra={"updated_fields": list(frame.config_update.updated_fields)},
                )

    async def _write_frames(
        self, call: Any, outbox: asyncio.Queue[agents_pb2.ConnectRequest | None]
    ) -> None:
        while True:
            frame = await outbox.get()
            try:
                if frame is None:
                    await call.done_writing()
                    return
                await call.write(frame)
            except asyncio.InvalidStateError:
                raise _StreamClosed("the stream is closed") from None

    async def _heartbeats(self) -> None:
        usage = _Usage()
        while True:
            heartbeat = agents_pb2.AgentHeartbeat(
                current_load=len(self._running),
                task_ids=self.held_task_ids,
                resources=usage.now(),
            )
            heartbeat.heartbeat.time.GetCurrentTime()
            self._send(agents_pb2.ConnectRequest(heartbeat=heartbeat))
            self._resend_stale()
            await asyncio.sleep(self._interval)

    def _resend_stale(self) -> None:
        # The server answers a result it could not record (its tasks service briefly down)
        # with no ack at all; recording is idempotent per attempt token, so send it again.
        stale = time.monotonic() - max(2 * self._interval, 10.0)
        for pending in self._pending.values():
            if pending.sent_at < stale:
                pending.sent_at = time.monotonic()
                self._send(pending.frame)

    def _send(self, frame: agents_pb2.ConnectRequest) -> bool:
        """Queues a frame for the writer; False when there is no stream or it is backed up
        (outcomes stay pending and go again; progress and pongs are best effort)."""
        if self._outbox is None:
            return False
        try:
            self._outbox.put_nowait(frame)
        except asyncio.QueueFull:
            return False
        return True

    async def _drain(
        self, reader: asyncio.Task[None], outbox: asyncio.Queue[agents_pb2.ConnectRequest | None]
    ) -> None:
        """stop() while connected. Running handlers are cancelled without an outcome: the mesh
        queues their tasks again once this agent is gone, at the latest when their leases run
        out. (A retryable error instead would have the server assign them straight back to
        this still-connected agent, an attempt spent each time.) Finished outcomes get a moment
        to be acknowledged."""
        await self._cancel_all()
        deadline = time.monotonic() + DRAIN_SECONDS
        while self._pending and not reader.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._pending:
            log.warning("stopping with %d unacknowledged outcomes", len(self._pending))
        with contextlib.suppress(asyncio.QueueFull):
            outbox.put_nowait(None)
        await asyncio.wait({reader}, timeout=1.0)

    # -- work ------------------------------------------------------------------------------

    def _assigned(self, assignment: tasks_pb2.Assignment) -> None:
        task, token = assignment.task, assignment.attempt_token
        if not task.task_id or not token:
            log.warning("ignoring an assignment without task id or attempt token")
            return
        if (task.task_id, token) in self._pending:
            return  # repeated after a reconnection; its outcome is already on its way
        current = self._running.get(task.task_id)
        if current is not None:
            if current.token == token:
                return  # repeated after a reconnection; still working on it
            # A newer attempt of the same task: the old one's outcome would be refused.
            self._drop(current)
        extra = {"task_id": task.task_id, "task_type": task.type, "attempt": assignment.attempt}
        if self._stopping.is_set():
            log.info("stopping: not starting the task", extra=extra)
            return
        handler = self.handler_for(task)
        if handler is None:
            log.warning("no handler for the task", extra=extra)
            error = tasks_pb2.TaskError(
                code="UNSUPPORTED_TASK_TYPE",
                message=f"this agent has no handler for task type {task.type!r}"[:MESSAGE_LIMIT],
                retryable=False,
            )
            self._complete(task.task_id, token, error)
            return
        log.info("task assigned", extra=extra)
        job = _Job(task=task, token=token)
        self._running[task.task_id] = job
        job.runner = self._spawn(self._work(job, handler))

    async def _work(self, job: _Job, handler: Handler) -> None:
        task_id = job.task.task_id
        try:
            async with self._slots:
                if job.dropped:
                    return
                outcome = await execute(handler, job.task, self._reporter(job))
        finally:
            if self._running.get(task_id) is job:
                del self._running[task_id]
        # A handler that swallowed its cancellation still must not report.
        if not job.dropped:
            self._complete(task_id, job.token, outcome)

    def _reporter(self, job: _Job) -> Progress:
        last: tuple[int, str] | None = None
        sent_at = 0.0

        async def report(progress: int, message: str = "") -> None:
            nonlocal last, sent_at
            value = max(0, min(100, int(progress)))
            now = time.monotonic()
            if job.dropped or last == (value, message):
                return
            if last is not None and value < 100 and now - sent_at < PROGRESS_INTERVAL:
                return
            last, sent_at = (value, message), now
            frame = agents_pb2.TaskProgress(
                task_id=job.task.task_id,
                attempt_token=job.token,
                progress=value,
                message=_text(message),
            )
            self._send(agents_pb2.ConnectRequest(progress=frame))

        return report

    def _complete(self, task_id: str, token: str, outcome: Outcome) -> None:
        result = agents_pb2.TaskResult(task_id=task_id, attempt_token=token)
        if isinstance(outcome, tasks_pb2.TaskError):
            result.error.CopyFrom(outcome)
            log.info("task failed", extra={"task_id": task_id, "code": outcome.code})
        else:
            result.result.CopyFrom(outcome)
            log.info("task done", extra={"task_id": task_id})
        pending = _Pending(agents_pb2.ConnectRequest(result=result), sent_at=time.monotonic())
        self._pending[(task_id, token)] = pending
        self._send(pending.frame)

    def _acknowledged(self, ack: agents_pb2.TaskResultAck) -> None:
        if self._pending.pop((ack.task_id, ack.attempt_token), None) is None:
            return
        extra = {"task_id": ack.task_id, "status": ack.status, "reason": ack.reason}
        if ack.accepted:
            log.info("outcome recorded", extra=extra)
        else:
            # A stale attempt (lease lost while we worked) or a vanished task: nothing to redo.
            log.warning("outcome refused", extra=extra)

    def _cancelled(self, cancellation: agents_pb2.Cancellation) -> None:
        task_id, token = cancellation.task_id, cancellation.attempt_token
        job = self._running.get(task_id)
        if token and job is not None and job.token != token:
            # It stops another attempt than the one running here (e.g. the one before).
            log.info("ignoring a cancellation of another attempt", extra={"task_id": task_id})
            return
        extra = {"task_id": task_id, "reason": cancellation.reason}
        if cancellation.message:
            extra["stop_message"] = cancellation.message  # "message" is the record's own
        log.info("task cancelled", extra=extra)
        if job is not None:
            self._drop(job)
        for key in [k for k in self._pending if k[0] == task_id and (not token or k[1] == token)]:
            del self._pending[key]

    def _drop(self, job: _Job) -> None:
        job.dropped = True
        if self._running.get(job.task.task_id) is job:
            del self._running[job.task.task_id]
        if job.runner is not None:
            job.runner.cancel()

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        # The loop keeps only weak references to tasks; a dropped handler still has to finish
        # unwinding, so hold on to every task until it is done.
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _cancel_all(self) -> None:
        if self._running:
            log.info("cancelling %d running tasks", len(self._running))
        for job in list(self._running.values()):
            self._drop(job)
        if self._tasks:
            _, stuck = await asyncio.wait(set(self._tasks), timeout=CANCEL_GRACE)
            if stuck:
                log.warning("%d handlers ignored their cancellation", len(stuck))

    # -- setup -----------------------------------------------------------------------------

    def _check_capabilities(self) -> None:
        capabilities = self.capabilities
        if not 1 <= len(capabilities) <= 32:
            raise ValueError("an agent needs 1 to 32 capabilities (or handlers)")
        if any(not TYPE_NAME.fullmatch(c) for c in capabilities):
            raise ValueError(f"each capability is a task type: {TYPE_RULE}")

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[signal.Signals]:
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread, or a loop without signal support
            installed.append(sig)
        return installed
