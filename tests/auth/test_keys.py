"""The signing key and the shared secrets, created once however many processes start at once
(replicas sharing a data directory)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from servers.auth.keys import SigningKey, write_once

# Each process loads (or creates) the key and the internal token, and prints what it got.
PROBE = """
import sys
from pathlib import Path
from servers.auth.keys import SigningKey
from servers.mesh import internal_token
d = Path(sys.argv[1])
print(SigningKey.load_or_create(d).jwks()["keys"][0]["kid"], internal_token(d))
"""


def test_processes_starting_together_share_one_key_and_one_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AGENTMESH_INTERNAL_TOKEN"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROBE, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(8)
    ]
    answers = set()
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        answers.add(out.strip())
    assert len(answers) == 1
    kid, token = answers.pop().split()
    assert SigningKey.load_or_create(tmp_path).jwks()["keys"][0]["kid"] == kid and token
    keys = tmp_path / "keys"
    assert sorted(p.name for p in keys.iterdir()) == ["internal-token", "signing-key.pem"]
    assert stat.S_IMODE((keys / "signing-key.pem").stat().st_mode) == 0o600


def test_write_once_keeps_the_first(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    write_once(path, b"first")
    write_once(path, b"second")
    assert path.read_bytes() == b"first" and list(tmp_path.iterdir()) == [path]
