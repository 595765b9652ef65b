"""Starting `agentmesh up` as a child process on free ports, for tests and benchmarks.

with MeshProcess(data_dir=tmp) as mesh:
    httpx.get(mesh.url + "/health")
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PORT_TRIES = 3
PORT_TAKEN = "is already in use"  # how `agentmesh up` refuses a port another process holds


class PortTaken(RuntimeError):
    """The mesh did not start: its public port was taken."""


class MeshProcess:
    """A whole mesh (four services and Envoy) in a child process, on free ports."""

    def __init__(
        self,
        *,
        data_dir: Path,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self._port_given = port is not None
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.services: dict[str, str] = {}
        self.envoy_admin = ""
        self.metrics = ""  # the process's own metrics port, host:port, when it has one
        self.startup_timeout = startup_timeout
        self._env = {
            **os.environ,
            "AGENTMESH_DATA_DIR": str(self.data_dir),
            "AGENTMESH_PORT": str(self.port),
            # INFO, as `agentmesh up` runs: tests must take the code paths users take.
            "AGENTMESH_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "mesh-process.log"

    def start(self) -> MeshProcess:
        """Starts the mesh and waits until it answers. A free port chosen here may be taken by
        another process before the mesh binds it; the mesh then refuses to start, and is
        started again on another (at most PORT_TRIES times)."""
        for tries_left in reversed(range(PORT_TRIES)):
            try:
                return self._start()
            except PortTaken:
                if self._port_given or not tries_left:
                    raise
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
                self._env["AGENTMESH_PORT"] = str(self.port)
        raise AssertionError("unreachable")

    def _start(self) -> MeshProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        state_file = self.data_dir / "run" / "mesh.json"
        state_file.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        begun = log.tell()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "servers.cli", "up"],
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.output()
                failure = PortTaken if PORT_TAKEN in self._output_since(begun) else RuntimeError
                raise failure(f"agentmesh up exited with {self.proc.returncode}:\n{output}")
            if state_file.exists() and self._live():
                state = json.loads(state_file.read_text())
                self.services = dict(state["services"])
                self.envoy_admin = state["envoy_admin"]
                self.metrics = str(state.get("metrics", ""))
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"agentmesh up was not ready in {self.startup_timeout}s:\n{self.output()}"
        )

    def _live(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health/live", timeout=1) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def _output_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, and SIGKILL as a last resort; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> MeshProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
