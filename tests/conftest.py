"""Fixtures shared by every test: PostgreSQL databases, and whole meshes as real processes."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis

from servers.launcher import MeshProcess, free_port

PG_ADMIN_DSN = os.environ.get("AGENTMESH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(what: str, exc: BaseException) -> None:
    """In CI a missing service fails the test; on a laptop it skips with the reason."""
    message = f"{what} is not reachable ({exc}); start it (see .ci/run)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


async def _pg(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test session (dropped afterwards)."""
    yield from _fresh_postgres()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each database the mesh supports, empty for this test: SQLite in a temporary folder, and
    a database of its own on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
        return
    yield from _fresh_postgres()


def _fresh_postgres() -> Iterator[str]:
    name = f"agentmesh_test_{secrets.token_hex(4)}"
    try:
        asyncio.run(_pg(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        _unavailable("PostgreSQL on 127.0.0.1:5432", exc)
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    yield f"{base}/{name}"
    asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# Every test registers and logs in from 127.0.0.1; shared meshes must not hit seed 001's 10
# logins (and registrations) an hour.
# tests/e2e/test_login_limits.py runs its own mesh with the default.
# Idle event and inbox streams send a heartbeat every second, so that tests see them soon.
SHARED_MESH_ENV = {
    "AGENTMESH_LOGIN_LIMIT": "100000",
    "AGENTMESH_REGISTER_LIMIT": "100000",
    "AGENTMESH_STREAM_HEARTBEAT_SECONDS": "1",
}


def _boot(tmp: Path, **env: str) -> MeshProcess:
    return MeshProcess(data_dir=tmp, env={**SHARED_MESH_ENV, **env}).start()


def _stop_clean(proc: MeshProcess) -> None:
    """Stops a shared mesh and checks what every test before put it through left no trace:
    a clean exit, and no script error in Envoy's log (the Lua filter fails silently else)."""
    assert proc.stop() == 0, proc.output()
    errors = [
        line
        for line in (proc.data_dir / "logs" / "envoy.log").read_text().splitlines()
        if "[error]" in line or "[critical]" in line
    ]
    assert errors == []


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    """The embedded mesh on its default (SQLite), shared by the tests that only read it."""
    proc = _boot(tmp_path_factory.mktemp("mesh"))
    yield proc
    _stop_clean(proc)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def any_mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MeshProcess]:
    """The mesh on each database: tests using it run once on SQLite, once on PostgreSQL."""
    if request.param == "sqlite":
        yield request.getfixturevalue("mesh")
        return
    url = request.getfixturevalue("postgres_url")
    proc = _boot(tmp_path_factory.mktemp("pgmesh"), DATABASE_URL=url)
    yield proc
    _stop_clean(proc)


RedisServer = tuple[str, subprocess.Popen[bytes]]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, on a free port: the test may stop it."""
    binary = shutil.which("redis-server")
    if binary is None:
        if IN_CI:
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            time.sleep(0.05)
    client.close()
    try:
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.kill()
        proc.wait()


def restart_redis(server: RedisServer) -> subprocess.Popen[bytes]:
    """The stopped redis-server of ``server`` again, on the same port (empty: it keeps no
    data); the caller kills it."""
    url, stopped = server
    again = subprocess.Popen(stopped.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis.from_url(url)
    try:
        for _ in range(200):
            try:
                if client.ping():
                    return again
            except redis.ConnectionError:
                time.sleep(0.05)
    finally:
        client.close()
    again.kill()
    again.wait()
    raise AssertionError("redis-server did not come back")
