"""Task dispatch end to end: N agents with a no-op handler and M tasks, against Celery on the
machine's Redis with the same no-op task and as many workers, measured in the same run.

  agentmesh_burst   M tasks created at once by C concurrent creators (TasksService.CreateTask
                    over grpc.aio straight to the tasks server), done by N agent processes
                    (servers.agent.Agent, capacity 1, connected through Envoy)
  agentmesh_serial  one task in flight for --seconds: create it, wait until it has completed,
                    pause, again. Every task finds the agents idle: the dispatch latency of the
                    mesh itself, without queueing
  celery_burst      the baseline: the same M tasks with apply_async from one thread, done by N
                    worker processes (--pool solo: one task at a time each), acks_late, prefetch
                    multiplier 1, Redis as broker and result backend
  celery_serial     the same, one task in flight

tasks/s is the tasks completed over the makespan, from the first create sent to the last task
completed (for a serial case: one over the round trip, pause included). Dispatch latency runs
from the client's send of the create to the task's assignment (agentmesh: the task.assigned event
of the tasks outbox) or, for Celery, which has no assigned state, to the task's start in the
worker. In a burst it is mostly time spent waiting in the queue.

`python -m bench.dispatch --agent-worker ...` and `--celery-worker ...` are the worker processes
this benchmark starts; they are not meant to be run by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import httpx

from agentmesh.v1 import tasks_pb2, tasks_pb2_grpc
from bench import auth_me
from bench.auth_me import CHANNEL_OPTIONS, CaseResult, Settings, _loopback, _percentile
from servers.launcher import MeshProcess

NAME = "dispatch"
BASELINE = "celery_burst (throughput), celery_serial (dispatch latency)"
AGENTS = 4  # N: agent processes, and as many Celery worker processes
TASKS = 500  # M: tasks of each burst
SERIAL_MIN, SERIAL_MAX = 20, 2_000  # tasks of a serial case, whatever --seconds says
SERIAL_POLL = 0.002  # how often a serial case looks whether its task has finished
SERIAL_PAUSE = 0.01  # and how long it waits after that, for the system to settle
TASK_TIMEOUT = 30.0  # one serial task, created to finished
FINISHED = ("completed", "failed", "cancelled", "stopped")
MAX_TASKS = 100_000
MAX_ERRORS = 100  # a creating loop gives up after this many failures
TASK_TYPE = "noop"
GOAL_P50_MS = 10.0
CALL_TIMEOUT = 10.0
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
POLL_SECONDS = 0.1
# --database postgres: the server to create the mesh's database on (as tests/conftest.py's)
PG_ADMIN_DSN = os.environ.get("AGENTMESH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 15  # db 15 is flushed before and after
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
CELERY_TASK = "bench.noop"
MESH_ENV = {
    **auth_me.MESH_ENV,
    "AGENTMESH_LOGIN_LIMIT": "100000",
    "AGENTMESH_REGISTER_LIMIT": "100000",
}
REPO = Path(__file__).resolve().parent.parent


def _phase_timeout(count: int) -> float:
    """How long a phase of `count` tasks may take, creating and completing: 5 tasks/s at worst."""
    return 60.0 + count / 5.0


@dataclass(frozen=True, kw_only=True)
class Goal:
    text: str
    met: bool | None  # None: not judged (the baseline was skipped)


@dataclass(frozen=True, kw_only=True)
class Report(auth_me.Report):
    """auth_me's report, with the table's words for what is counted and timed, and the goals."""

    count_label: str = "tasks"
    latency_label: str = "dispatch"
    goals: tuple[Goal, ...] = ()


@dataclass
class _Tally:
    """One phase of one system: what the client sent and what the system recorded."""

    sent: dict[str, float] = field(default_factory=dict)  # task id -> epoch s, before the create
    create_seconds: float = 0.0  # first create sent to last create answered
    dispatched: dict[str, float] = field(default_factory=dict)  # assigned (agentmesh) or started
    started: dict[str, float] = field(default_factory=dict)  # the handler's own time.time()
    done: dict[str, float] = field(default_factory=dict)  # completed (exactly once) at
    errors: int = 0
    first_error: str = ""
    reassigned: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by part, when metered
    cpu_wall: float = 0.0  # over this many seconds

    def fail(self, message: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or message[:300]

    def ok(self) -> list[str]:
        return [t for t in self.sent if t in self.done and t in self.dispatched]

    def makespan(self) -> float:
        ok = self.ok()
        return max(self.done[t] for t in ok) - min(self.sent.values()) if ok else 0.0

    def latencies_ms(self, of: dict[str, float]) -> list[float]:
        return sorted((of[t] - self.sent[t]) * 1000.0 for t in self.ok() if t in of)


def _case(name: str, tally: _Tally) -> CaseResult:
    latencies = tally.latencies_ms(tally.dispatched)
    return CaseResult(
        name=name,
        requests=len(tally.ok()),
        errors=tally.errors,
        seconds=tally.makespan(),
        p50_ms=_percentile(latencies, 0.50),
        p99_ms=_percentile(latencies, 0.99),
        first_error=tally.first_error,
    )


def _p50_p99(values: list[float]) -> str:
    p50, p99 = _percentile(values, 0.50), _percentile(values, 0.99)
    return "-" if p50 is None or p99 is None else f"{p50:.2f}/{p99:.2f} ms"


def _epoch(stored: str | datetime) -> float:
    """A stored timestamp as epoch s: SQLite's text keeps UTC without an offset, Celery's has
    one, PostgreSQL's comes as an aware datetime."""
    moment = stored if isinstance(stored, datetime) else datetime.fromisoformat(stored)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


# --- worker processes ---


@contextlib.contextmanager
def _processes(
    commands: Sequence[list[str]], logs: Path, env: Mapping[str, str] | None = None
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Starts the commands (stdout and stderr to logs/NUMBER.log), with `env` added to this
    process's environment; SIGTERM, then SIGKILL, at the end, whatever happened."""
    logs.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for number, command in enumerate(commands):
            with (logs / f"{number}.log").open("ab") as log:
                procs.append(
                    subprocess.Popen(
                        command,
                        cwd=REPO,
                        env=full_env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _log_tail(logs: Path) -> str:
    tails = []
    for log in sorted(logs.glob("*.log")):
        tails.append(f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}")
    return "\n".join(tails)


def _check_alive(procs: list[subprocess.Popen[bytes]], logs: Path, what: str) -> None:
    for proc in procs:
        if proc.poll() is not None:
            raise RuntimeError(f"a {what} exited with {proc.returncode}:\n{_log_tail(logs)}")


# --- CPU time, by part of a system ---

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces): state,
    parent, ..., user and system time at 11 and 12. Raises OSError when it cannot be read."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()


def _cpu_seconds(pid: int) -> float | None:
    """The user and system CPU time a process has used so far, read from /proc (Linux); None
    when it has gone or there is no /proc."""
    try:
        fields = _stat(pid)
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the mesh's Envoy), from /proc; none without it."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(_stat(entry.name)[1]) == pid:
                    found.append(int(entry.name))
    return found


class _Meter:
    """The CPU time each part of a system (its processes, by name) uses over a phase; the part
    "client" is this process, the load generator. A part one of whose processes could not be
    read at both ends is left out, rather than counted short."""

    def __init__(self, parts: Mapping[str, Sequence[int]]) -> None:
        self._parts = {name: list(pids) for name, pids in parts.items()}
        self._start: dict[str, float] = {}
        self._began = 0.0

    def _read(self) -> dict[str, float]:
        seconds = {"client": time.process_time()}
        for name, pids in self._parts.items():
            each = [_cpu_seconds(pid) for pid in pids]
            if pids and all(value is not None for value in each):
                seconds[name] = sum(value for value in each if value is not None)
        return seconds

    def start(self) -> None:
        self._start, self._began = self._read(), time.monotonic()

    def stop(self) -> tuple[dict[str, float], float]:
        """CPU seconds by part since start(), and the seconds that passed."""
        end = self._read()
        used = {name: end[name] - self._start[name] for name in end if name in self._start}
        return used, time.monotonic() - self._began


def _this_module(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.dispatch", *args]


# --- agentmesh ---


def _expect(reply: httpx.Response, status: int, what: str) -> dict[str, Any]:
    if reply.status_code != status:
        raise RuntimeError(f"{what} answered {reply.status_code}: {reply.text[:300]}")
    return dict(reply.json())


def _developer(mesh: MeshProcess, env: Mapping[str, str] = MESH_ENV) -> tuple[str, str]:
    """Registers a user, makes it a developer (the operator's grant-role) and logs in; returns
    its access token and an API key of the `agent` scope."""
    user = {"username": "bench-dispatch", "email": "bench-dispatch@example.com"}
    password = "bench-pass-123"
    with httpx.Client(base_url=mesh.url, timeout=CALL_TIMEOUT, trust_env=False) as http:
        _expect(
            http.post("/api/v1/auth/register", json={**user, "password": password}), 201, "register"
        )
        subprocess.run(
            [sys.executable, "-m", "servers.cli", "grant-role", user["username"], "developer"],
            cwd=REPO,
            env={**os.environ, **env, "AGENTMESH_DATA_DIR": str(mesh.data_dir)},
            check=True,
            capture_output=True,
            timeout=60,
        )
        login = {"username": user["username"], "password": password}
        token = str(
            _expect(http.post("/api/v1/auth/login", json=login), 200, "login")["access_token"]
        )
        created = http.post(
            "/api/v1/auth/api-keys",
            json={"name": "bench-agents", "scopes": ["agent"]},
            headers={"Authorization": f"Bearer {token}"},
        )
        key = str(_expect(created, 201, "api key")["key"])
    return token, key


def _wait_ready(ready: Path, count: int, procs: list[subprocess.Popen[bytes]], logs: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        _check_alive(procs, logs, "agent")
        if len(list(ready.glob("*"))) >= count:
            return
        time.sleep(POLL_SECONDS)
    raise RuntimeError(f"agents not connected in {STARTUP_TIMEOUT}s:\n{_log_tail(logs)}")


Create = Callable[[], Awaitable[str | None]]  # creates one task; its id, None if it failed


async def _burst(create: Create, count: int, creators: int, tally: _Tally) -> None:
    """`creators` concurrent callers create `count` tasks between them, back to back."""
    issued = 0

    async def creator() -> None:
        nonlocal issued
        while issued < count and tally.errors < MAX_ERRORS:
            issued += 1
            await create()

    await asyncio.gather(*(creator() for _ in range(max(1, min(creators, count)))))


def _serial_count(number: int, ends: float, tally: _Tally) -> bool:
    """Whether the serial phase goes on to its task `number`: for its time, with at least
    SERIAL_MIN tasks and at most SERIAL_MAX, and while it fails less than MAX_ERRORS times."""
    if number >= SERIAL_MAX or tally.errors >= MAX_ERRORS:
        return False
    return number < SERIAL_MIN or time.monotonic() < ends


async def _serial(
    create: Create, finished: Callable[[str], Awaitable[bool]], seconds: float, tally: _Tally
) -> None:
    """One task in flight: create it, wait until it has finished, pause, again. Each task finds
    the workers idle, so its dispatch latency is the system's own, without queueing."""
    ends, number = time.monotonic() + seconds, 0
    while _serial_count(number, ends, tally):
        number += 1
        task_id = await create()
        if task_id is None:
            continue
        deadline = time.monotonic() + TASK_TIMEOUT
        while not await finished(task_id):
            if time.monotonic() >= deadline:
                return  # the collection reports it
            await asyncio.sleep(SERIAL_POLL)
        await asyncio.sleep(SERIAL_PAUSE)


class _Records:
    """What the mesh recorded, read beside it: its SQLite file, read-only (WAL keeps the mesh's
    writers going), or its PostgreSQL database. Queries use ``?`` placeholders."""

    def __init__(self, *, sqlite: Path | None = None, postgres: Any = None) -> None:
        self._sqlite = (
            None
            if sqlite is None
            else sqlite3.connect(
                f"file:{sqlite}?mode=ro", uri=True, timeout=10, check_same_thread=False
            )
        )
        self._postgres = postgres  # an asyncpg connection

    async def fetch(self, query: str, *args: object, inline: bool = False) -> list[tuple[Any, ...]]:
        """The rows; ``inline``: a primary-key read on SQLite, run on the loop's thread (it
        takes microseconds) rather than sent to a thread."""
        if self._sqlite is not None:
            run = self._sqlite.execute
            if inline:
                return list(run(query, args).fetchall())
            return await asyncio.to_thread(lambda: list(run(query, args).fetchall()))
        numbers = iter(range(1, len(args) + 1))
        numbered = re.sub(r"\?", lambda _: f"${next(numbers)}", query)
        return [tuple(row) for row in await self._postgres.fetch(numbered, *args)]

    async def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._postgres is not None:
            await self._postgres.close()


async def _outbox_mark(records: _Records) -> int:
    return int((await records.fetch("SELECT coalesce(max(id), 0) FROM tasks_outbox"))[0][0])


async def _collect_agentmesh(records: _Records, mark: int, tally: _Tally) -> None:
    """Every sent task's assignment and completion from the outbox, its start from its result."""
    assigned: dict[str, list[float]] = {}
    completed: dict[str, list[float]] = {}
    events = await records.fetch(
        "SELECT subject_id, event_type, created_at FROM tasks_outbox"
        " WHERE id > ? AND event_type IN ('task.assigned', 'task.completed') ORDER BY id",
        mark,
    )
    for task_id, event, at in events:
        (assigned if event == "task.assigned" else completed).setdefault(task_id, []).append(
            _epoch(at)
        )
    rows = await records.fetch(
        "SELECT task_id, status, result FROM tasks_tasks WHERE type = ?", TASK_TYPE
    )
    results = {task_id: (status, result) for task_id, status, result in rows}
    for task_id in tally.sent:
        status, result = results.get(task_id, ("missing", None))
        ends = completed.get(task_id, [])
        if status != "completed" or len(ends) != 1 or task_id not in assigned:
            tally.fail(
                f"task {task_id}: status {status}, completed {len(ends)} times, assigned"
                f" {len(assigned.get(task_id, []))} times"
            )
            continue
        tally.dispatched[task_id] = assigned[task_id][0]
        tally.done[task_id] = ends[0]
        tally.reassigned += len(assigned[task_id]) > 1
        started = json.loads(result).get("started") if result else None
        if isinstance(started, int | float):
            tally.started[task_id] = float(started)


Fill = Callable[[Create, _Tally], Awaitable[None]]


async def _agentmesh_phase(
    stub: Any, token: str, records: _Records, fill: Fill, meter: _Meter | None = None
) -> _Tally:
    """Creates tasks with `fill`, waits until as many have completed, and reads the outcome;
    with a `meter`, the CPU time used from the first create until then."""
    tally = _Tally()
    mark = await _outbox_mark(records)
    auth = (("authorization", f"Bearer {token}"),)
    request = tasks_pb2.CreateTaskRequest(type=TASK_TYPE, description="bench no-op")
    first_sent = 0.0

    async def create() -> str | None:
        nonlocal first_sent
        sent = time.time()
        first_sent = first_sent or sent
        try:
            task = await stub.CreateTask(request, metadata=auth, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            tally.fail(f"CreateTask: {exc.code().name}: {exc.details()}")
            return None
        if not task.task_id or task.task_id in tally.sent:
            tally.fail(f"CreateTask answered task id {task.task_id!r}")
            return None
        tally.sent[task.task_id] = sent
        tally.create_seconds = time.time() - first_sent
        return str(task.task_id)

    if meter:
        meter.start()
    await fill(create, tally)
    deadline = time.monotonic() + _phase_timeout(len(tally.sent))
    query = "SELECT count(*) FROM tasks_outbox WHERE id > ? AND event_type = 'task.completed'"
    while time.monotonic() < deadline:
        (count,) = (await records.fetch(query, mark))[0]
        if int(count) >= len(tally.sent):
            break
        await asyncio.sleep(POLL_SECONDS)
    if meter:
        tally.cpu, tally.cpu_wall = meter.stop()
    await _collect_agentmesh(records, mark, tally)
    return tally


async def _drive_agentmesh(
    mesh: MeshProcess, token: str, settings: Settings, tasks: int, postgres: str, meter: _Meter
) -> dict[str, _Tally]:
    if postgres:
        import asyncpg

        records = _Records(postgres=await asyncpg.connect(postgres, timeout=CALL_TIMEOUT))
    else:
        records = _Records(sqlite=mesh.data_dir / "agentmesh.db")
    address = _loopback(mesh.services["tasks"])
    try:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = tasks_pb2_grpc.TasksServiceStub(channel)

            async def burst_of(count: int, metered: _Meter | None = None) -> _Tally:
                return await _agentmesh_phase(
                    stub,
                    token,
                    records,
                    lambda c, t: _burst(c, count, settings.concurrency, t),
                    metered,
                )

            async def finished(task_id: str) -> bool:
                rows = await records.fetch(
                    "SELECT status FROM tasks_tasks WHERE task_id = ?", task_id, inline=True
                )
                return bool(rows) and rows[0][0] in FINISHED

            warm = await burst_of(settings.warmup) if settings.warmup else _Tally()
            burst = await burst_of(tasks, meter)
            serial = await _agentmesh_phase(
                stub, token, records, lambda c, t: _serial(c, finished, settings.seconds, t)
            )
    finally:
        await records.close()
    return {"warmup": warm, "burst": burst, "serial": serial}


@contextlib.contextmanager
def _database(kind: str) -> Iterator[str]:
    """The mesh's DATABASE_URL: "" for the embedded SQLite; for "postgres", a fresh database on
    the machine's server (PG_ADMIN_DSN), dropped afterwards."""
    if kind != "postgres":
        yield ""
        return
    import asyncpg

    name = f"agentmesh_bench_{os.getpid()}_{int(time.time())}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=CALL_TIMEOUT)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _run_agentmesh(settings: Settings, agents: int, tasks: int, tmp: Path) -> dict[str, _Tally]:
    with _database(settings.database) as postgres:
        url = postgres.replace("postgresql://", "postgresql+asyncpg://", 1)
        env = {**MESH_ENV, "DATABASE_URL": url}
        mesh = MeshProcess(data_dir=tmp / "mesh", env=env)
        mesh.start()
        try:
            token, key = _developer(mesh, env)
            target = _loopback(mesh.url).removeprefix("http://")
            ready, logs = tmp / "agents-ready", tmp / "agents-logs"
            ready.mkdir()
            commands = [
                _this_module(
                    "--agent-worker", f"bench-{n}", "--target", target, "--ready", str(ready)
                )
                for n in range(agents)
            ]
            # The agents read their key only from the environment, never from argv.
            with _processes(commands, logs, {"AGENTMESH_API_KEY": key}) as procs:
                _wait_ready(ready, agents, procs, logs)
                assert mesh.proc is not None
                meter = _Meter(
                    {
                        "mesh": [mesh.proc.pid],
                        "envoy": _children(mesh.proc.pid),
                        "agents": [proc.pid for proc in procs],
                    }
                )
                tallies = asyncio.run(
                    _drive_agentmesh(mesh, token, settings, tasks, postgres, meter)
                )
                _check_alive(procs, logs, "agent")
                return tallies
        finally:
            mesh.stop()


# --- Celery ---


def _celery_app() -> Any:
    """The Celery side's app, the same in the client and the workers. The task is the no-op:
    it answers when it started, as the agents' handler does."""
    from celery import Celery

    app = Celery("bench_dispatch", broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=3600,
    )

    @app.task(name=CELERY_TASK)
    def noop() -> float:
        return time.time()

    return app


def _redis_problem() -> str:
    """Empty when Celery can run here; else why not."""
    try:
        metadata.version("celery")
    except metadata.PackageNotFoundError:
        return "Celery is not installed (the bench extra: pip install -e '.[dev,bench]')"
    import redis

    client = redis.Redis(
        host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_timeout=2, socket_connect_timeout=2
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"Redis at {REDIS_HOST}:{REDIS_PORT} is not answering ({exc})"
    finally:
        client.close()
    return ""


def _flush_redis() -> None:
    import redis

    with redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_timeout=5) as client:
        client.flushdb()


def _redis_pids() -> list[int]:
    """The Redis server's process, when it runs on this machine (it says its pid)."""
    import redis

    with redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_timeout=5) as client:
        pid = int(client.info("server").get("process_id", 0))
    return [pid] if pid and _cpu_seconds(pid) is not None else []


def _wait_workers(app: Any, count: int, procs: list[subprocess.Popen[bytes]], logs: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        _check_alive(procs, logs, "Celery worker")
        replies = app.control.ping(timeout=1.0) or []
        if len({name for reply in replies for name in reply}) >= count:
            return
    raise RuntimeError(f"Celery workers not ready in {STARTUP_TIMEOUT}s:\n{_log_tail(logs)}")


def _celery_phase(
    app: Any, count: int | None, seconds: float, meter: _Meter | None = None
) -> _Tally:
    """Sends `count` no-op tasks back to back, or with `count` None one at a time for `seconds`
    (as _serial); waits for their results in the backend, and reads each one's start (its
    result) and end (date_done). With a `meter`, the CPU time used until all had finished."""
    tally = _Tally()
    if meter:
        meter.start()
    task, backend = app.tasks[CELERY_TASK], app.backend
    first_sent = time.time()

    def send() -> str | None:
        sent = time.time()
        try:
            result = task.apply_async()
        except Exception as exc:  # any failure to send counts; the first one is reported
            tally.fail(f"apply_async: {type(exc).__name__}: {exc}")
            return None
        tally.sent[result.id] = sent
        tally.create_seconds = time.time() - first_sent
        return str(result.id)

    if count is not None:
        for _ in range(count):
            if tally.errors >= MAX_ERRORS:
                break
            send()
    else:
        ends, number = time.monotonic() + seconds, 0
        while _serial_count(number, ends, tally):
            number += 1
            task_id = send()
            if task_id is None:
                continue
            key, deadline = backend.get_key_for_task(task_id), time.monotonic() + TASK_TIMEOUT
            while backend.client.get(key) is None and time.monotonic() < deadline:
                time.sleep(SERIAL_POLL)
            if time.monotonic() >= deadline:
                break  # reported below
            time.sleep(SERIAL_PAUSE)
    waiting = list(tally.sent)
    deadline = time.monotonic() + _phase_timeout(len(waiting))
    while waiting and time.monotonic() < deadline:
        values = backend.client.mget([backend.get_key_for_task(t) for t in waiting])
        still = []
        for task_id, raw in zip(waiting, values, strict=True):
            meta = backend.decode_result(raw) if raw else None
            if meta is None or meta.get("status") not in ("SUCCESS", "FAILURE"):
                still.append(task_id)
            elif meta["status"] != "SUCCESS" or not isinstance(meta.get("result"), float):
                tally.fail(f"task {task_id}: {meta.get('status')} {meta.get('result')!r}"[:300])
            else:
                tally.started[task_id] = tally.dispatched[task_id] = float(meta["result"])
                tally.done[task_id] = _epoch(str(meta["date_done"]))
        waiting = still
        if waiting:
            time.sleep(POLL_SECONDS)
    if meter:
        tally.cpu, tally.cpu_wall = meter.stop()
    for task_id in waiting:
        tally.fail(f"task {task_id}: no result in time")
    return tally


def _run_celery(settings: Settings, agents: int, tasks: int, tmp: Path) -> dict[str, _Tally]:
    app = _celery_app()
    logs = tmp / "celery-logs"
    commands = [_this_module("--celery-worker", f"bench-{n}") for n in range(agents)]
    _flush_redis()
    try:
        with _processes(commands, logs) as procs:
            _wait_workers(app, agents, procs, logs)
            warm = _celery_phase(app, settings.warmup, 0) if settings.warmup else _Tally()
            meter = _Meter({"workers": [proc.pid for proc in procs], "redis": _redis_pids()})
            burst = _celery_phase(app, tasks, 0, meter)
            serial = _celery_phase(app, None, settings.seconds)
            _check_alive(procs, logs, "Celery worker")
        return {"warmup": warm, "burst": burst, "serial": serial}
    finally:
        with contextlib.suppress(Exception):
            app.close()
        _flush_redis()


# --- the report ---


def _cpu_note(system: str, tally: _Tally) -> str:
    """What one completed task of a burst cost in CPU, by part, and how busy each part was."""
    done = len(tally.ok())
    if not tally.cpu or not done or tally.cpu_wall <= 0:
        return f"{system}: not measured (no /proc, or no task completed)"
    parts = sorted(tally.cpu.items(), key=lambda item: -item[1])
    total = sum(seconds for _, seconds in parts) * 1000 / done
    each = ", ".join(
        f"{name} {seconds * 1000 / done:.2f} ({seconds / tally.cpu_wall:.0%})"
        for name, seconds in parts
    )
    return f"{system} {total:.2f} = {each}"


def _report(
    agentmesh: dict[str, _Tally],
    celery: dict[str, _Tally] | None,
    skipped: str,
    *,
    agents: int,
    tasks: int,
    settings: Settings,
) -> Report:
    def with_warmup(tally: _Tally, warm: _Tally) -> _Tally:
        # Warm-up failures count, as in auth_me: the numbers are then not valid.
        if warm.errors:
            tally.errors += warm.errors
            tally.first_error = tally.first_error or f"warm-up: {warm.first_error}"
        return tally

    cases = [
        _case("agentmesh_burst", with_warmup(agentmesh["burst"], agentmesh["warmup"])),
        _case("agentmesh_serial", agentmesh["serial"]),
    ]
    ratios: tuple[tuple[str, str], ...] = ()
    if celery is not None:
        cases += [
            _case("celery_burst", with_warmup(celery["burst"], celery["warmup"])),
            _case("celery_serial", celery["serial"]),
        ]
        ratios = (("agentmesh_burst", "celery_burst"),)
    by_name = {case.name: case for case in cases}
    mesh_burst, mesh_serial = by_name["agentmesh_burst"], by_name["agentmesh_serial"]
    celery_burst = by_name.get("celery_burst")
    goals = (
        Goal(
            text="throughput at least Celery's (agentmesh_burst tasks/s >= celery_burst)",
            met=None if celery_burst is None else mesh_burst.rps >= celery_burst.rps,
        ),
        Goal(
            text=f"dispatch p50 under {GOAL_P50_MS:g} ms (agentmesh_serial, create to assigned)",
            met=mesh_serial.p50_ms is not None and mesh_serial.p50_ms < GOAL_P50_MS,
        ),
    )

    def to_start(tally: _Tally) -> str:
        return _p50_p99(tally.latencies_ms(tally.started))

    notes = [
        f"N = {agents} workers: {agents} agent processes (servers.agent.Agent, capacity 1, handler"
        f" '{TASK_TYPE}' answering its start time) connected through Envoy"
        + (
            f"; {agents} Celery worker processes, --pool solo (one task at a time each),"
            f" acks_late, prefetch multiplier 1, Redis {REDIS_URL} as broker and result backend"
            if celery
            else ""
        ),
        f"burst: M = {tasks} tasks after {settings.warmup} unmeasured ones; agentmesh:"
        f" CreateTask straight to the tasks server from {settings.concurrency} concurrent"
        " grpc.aio creators (--concurrency); Celery: apply_async from one thread. tasks/s ="
        " completed / (last completed - first create sent); its dispatch latency is mostly"
        " queueing",
        f"serial: one task in flight for {settings.seconds:g} s (--seconds; {SERIAL_MIN} tasks at"
        f" least), {SERIAL_PAUSE * 1000:g} ms pause after each; completion polled every"
        f" {SERIAL_POLL * 1000:g} ms (agentmesh: the task's row in its database; Celery: the"
        " result key)",
        "dispatch = the client's send of the create -> agentmesh task.assigned (outbox) / Celery"
        " task start (it has no assigned state)",
        f"like for like, send -> agentmesh handler start, p50/p99: burst"
        f" {to_start(agentmesh['burst'])}, serial {to_start(agentmesh['serial'])}",
        f"creating the burst took {agentmesh['burst'].create_seconds:.2f} s (agentmesh)"
        + (f", {celery['burst'].create_seconds:.2f} s (Celery)" if celery else ""),
        f"mesh: {'PostgreSQL' if settings.database == 'postgres' else 'SQLite'}, in-process"
        " bus; four services in one process, Envoy its child (--database)",
        f"CPU per completed task of the burst, in ms, by part (and the share of one core it"
        f" used, of the {os.cpu_count()} this machine has), from the first create until all had"
        f" completed: {_cpu_note('agentmesh', agentmesh['burst'])}"
        + (f"; {_cpu_note('Celery', celery['burst'])}" if celery else "")
        + (
            "; PostgreSQL's own processes are not counted"
            if settings.database == "postgres"
            else ""
        ),
    ]
    reassigned = sum(t.reassigned for t in agentmesh.values())
    if reassigned:
        notes.append(f"{reassigned} agentmesh tasks were assigned more than once")
    if celery is None:
        notes.append(f"CELERY SKIPPED: {skipped}")
    else:
        notes.append(f"celery {metadata.version('celery')}, kombu {metadata.version('kombu')}")
    return Report(
        name=NAME,
        title=f"task dispatch, {agents} no-op workers: agentmesh against Celery on Redis",
        baseline=BASELINE if celery is not None else f"none ({skipped})",
        cases=cases,
        ratios=ratios,
        notes=notes,
        goals=goals,
    )


def run(settings: Settings, *, agents: int = AGENTS, tasks: int = TASKS) -> Report:
    """Boots the mesh and its agents, measures, stops them; then the same with Celery."""
    if not 1 <= agents <= 64 or not 1 <= tasks <= MAX_TASKS:
        raise ValueError(f"1-64 agents and 1-{MAX_TASKS} tasks, not {agents} and {tasks}")
    with tempfile.TemporaryDirectory(prefix="agentmesh-bench-") as tmp:
        agentmesh = _run_agentmesh(settings, agents, tasks, Path(tmp))
        skipped = _redis_problem()
        if skipped:
            bar = "!" * 78
            print(f"\n{bar}\n{NAME}: {skipped}: the Celery half is skipped\n{bar}", flush=True)
            celery = None
        else:
            celery = _run_celery(settings, agents, tasks, Path(tmp))
    return _report(agentmesh, celery, skipped, agents=agents, tasks=tasks, settings=settings)


# --- the worker processes' entry points ---


def _agent_worker(name: str, target: str, ready: Path) -> int:
    from servers.agent import Agent, Progress

    agent = Agent(
        name=name,
        api_key=os.environ.get("AGENTMESH_API_KEY", ""),
        capabilities=[TASK_TYPE],
        capacity=1,
        target=target,
        on_welcome=lambda _welcome: (ready / name).touch(),
    )

    async def noop(task: tasks_pb2.Task, report: Progress) -> dict[str, object]:
        return {"started": time.time()}

    agent.add_handler(TASK_TYPE, noop)
    asyncio.run(agent.run())
    return 0


def _celery_worker(name: str) -> int:
    _celery_app().worker_main(
        [
            "worker",
            "--pool=solo",
            "--concurrency=1",
            "--loglevel=WARNING",
            f"--hostname={name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="worker processes of bench/dispatch.py")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--agent-worker", metavar="NAME", help="a no-op agent of this name")
    mode.add_argument("--celery-worker", metavar="NAME", help="a no-op Celery worker")
    parser.add_argument("--target", help="the mesh's public host:port (agent)")
    parser.add_argument("--ready", type=Path, help="directory to touch NAME in when welcomed")
    args = parser.parse_args(argv)
    if args.agent_worker:
        if not args.target or not args.ready:
            parser.error("--agent-worker needs --target and --ready")
        return _agent_worker(args.agent_worker, args.target, args.ready)
    return _celery_worker(args.celery_worker)


if __name__ == "__main__":
    sys.exit(main())
